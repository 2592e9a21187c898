//! The fuzz targets' corpora (fuzz/corpus/<target>: the interesting inputs cargo-fuzz
//! found, minimised, and every crash it found), replayed on stable so CI covers them
//! without nightly.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
        run(&std::fs::read(entry.path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn detect() {
    replay("detect", weft_proxy::fuzzing::detect);
}

#[test]
fn http1() {
    replay("http1", weft_proxy::fuzzing::http1);
}

#[test]
fn trace_context() {
    replay("trace_context", weft_proxy::fuzzing::trace_context);
}

#[test]
fn route_match() {
    replay("route_match", weft_proxy::fuzzing::route_match);
}

#[test]
fn control_proto() {
    replay("control_proto", weft_proxy::fuzzing::control_proto);
}
