//! Python virtual environments with pinned PyPI packages, made under target/ on first use and
//! reused while their requirements file is unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python of `target/{name}` with `requirements` (a path from the crate root) installed.
/// Two tests that need the same environment must not make it at once: call this once per
/// process (behind a `OnceLock`) when more than one test of a binary uses it.
pub fn pinned_python(name: &str, requirements: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join(name);
    let python = venv.join("bin/python");
    let stamp = venv.join("requirements.installed");
    let reqs = root.join(requirements);
    let wanted = std::fs::read_to_string(&reqs).unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 is needed to make a test environment (apt-get install python3-venv)");
    assert!(ok.success(), "python3 -m venv {} failed", venv.display());
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&reqs)
        .status()
        .unwrap();
    assert!(ok.success(), "installing {requirements} from PyPI failed");
    std::fs::write(&stamp, wanted).unwrap();
    python
}
