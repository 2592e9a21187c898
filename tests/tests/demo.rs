//! The README's first command: `weft demo` meshes two apps and shows live traffic.

use std::process::Command;

#[test]
fn demo_shows_meshed_traffic_and_stops_cleanly() {
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    let out = weft_e2e::run(
        Command::new(weft_e2e::bin("weft"))
            .args(["demo", "--seconds", "5", "--rate", "40", "--state-dir"])
            .arg(&dir),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<&str> = stdout.lines().filter(|l| l.starts_with("loadgen:")).collect();
    assert!(reports.len() >= 2, "{stdout}");
    for line in &reports {
        assert!(line.contains(" 0 failed"), "requests failed in the demo: {line}");
    }
    // The sidecars counted what the load generator sent.
    let last = reports.last().unwrap();
    let total: u64 =
        last.split("inbound total").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(total >= 80, "{last}");
    // Both sidecars drained and logged their access lines.
    let log = std::fs::read_to_string(dir.join("hello-proxy.log")).unwrap();
    assert!(log.contains("weft::access") && log.contains("drained"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}
