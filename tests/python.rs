//! The Python producer and worker in `examples/python`, written from
//! `PROTOCOL.md` alone, run against a live broker. The test makes its own
//! virtualenv under the target directory (pip needs PyPI the first time).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyenv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success();
        assert!(ok, "cannot create a virtualenv");
    }
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(root.join("examples/python/requirements.txt"))
        .status()
        .expect("pip")
        .success();
    assert!(ok, "pip install failed");
    python
}

#[test]
fn python_examples_work_against_a_live_broker() {
    run(Duration::from_secs(300), |h| {
        let python = venv_python();
        let base = free_base();
        h.broker(base);
        let smoke = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/smoke.py");
        let mut child = h.spawn_program(
            python.to_str().unwrap(),
            &[smoke.to_str().unwrap(), "--broker-base", &base.to_string()],
        );
        let status = child.wait().expect("smoke.py");
        assert!(
            status.success(),
            "smoke.py failed; see its log under target/tmp/logs"
        );
    });
}
