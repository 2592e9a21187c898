//! Sidecar injection checked as Kubernetes would: `weft inject`'s output for every
//! workload kind validates against the Kubernetes 1.29 and 1.37 schemas (PyPI
//! `kubernetes-validate`, strict: unknown fields refused), and the admission webhook
//! answers real AdmissionReview requests over HTTPS. No cluster runs here; the schemas
//! and the fake API server stand in for one.

use std::{path::PathBuf, process::Command};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../control-plane/testdata/inject")
}

/// Validates manifests with the Kubernetes schemas of `version`, strictly.
pub fn kubernetes_validate(version: &str, files: &[PathBuf]) -> Result<(), String> {
    let validator = weft_e2e::python().with_file_name("kubernetes-validate");
    let out = Command::new(validator)
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate runs (tests/run installs it in the test venv)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn weft_inject_output_validates_against_kubernetes_1_29_and_1_37() {
    let dir = std::env::temp_dir().join(format!("weft-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let input = entry.unwrap().path();
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.ends_with(".injected.yaml") {
            continue;
        }
        // The real binary, as a user runs it.
        let out = Command::new(weft_e2e::bin("weft")).arg("inject").arg(&input).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        // kubernetes-validate needs a name, which a generateName pod lacks until created.
        let text = String::from_utf8(out.stdout).unwrap().replace("generateName: words-", "name: words-x1");
        let path = dir.join(&name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    assert!(files.len() >= 9, "{files:?}");
    for version in ["1.29", "1.37"] {
        kubernetes_validate(version, &files).unwrap_or_else(|e| panic!("Kubernetes {version}: {e}"));
    }
    // From stdin too, with the report on stderr.
    let mut child = Command::new(weft_e2e::bin("weft"))
        .args(["inject", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&std::fs::read(testdata().join("job.yaml")).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Job report: injected"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("restartPolicy: Always"));
    let _ = std::fs::remove_dir_all(dir);
}
