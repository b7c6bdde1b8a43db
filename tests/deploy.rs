//! The deploy/ examples pass their tools' own validators: `nginx -t` (Debian's nginx-light,
//! which .ci/run installs) and kubernetes-validate (PyPI, pinned in deploy/requirements.txt,
//! installed into target/deploy-venv on first use). Each check is also run on a broken copy,
//! so a validator that accepts anything would fail the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn nginx() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("nginx is needed to check deploy/nginx/nginx.conf (apt-get install nginx-light)")
}

fn nginx_t(conf: &Path) -> Output {
    let prefix = tempfile::tempdir().unwrap();
    Command::new(nginx())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(format!("{}/", prefix.path().display()))
        .args(["-e", "stderr", "-g"])
        .arg(format!("pid {}/nginx.pid;", prefix.path().display()))
        .output()
        .unwrap()
}

#[test]
fn the_nginx_example_passes_nginx_t() {
    let conf = root().join("deploy/nginx/nginx.conf");
    let out = nginx_t(&conf);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("test is successful"), "{err}");

    let text = std::fs::read_to_string(&conf).unwrap();
    for needed in [
        "proxy_buffering off",
        "http_503 non_idempotent",
        "location = /ready",
    ] {
        assert!(text.contains(needed), "the example lost {needed:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("nginx.conf");
    std::fs::write(&broken, text.replace("least_conn;", "least_conn")).unwrap();
    assert!(
        !nginx_t(&broken).status.success(),
        "nginx -t accepted a broken file"
    );
}

fn kubernetes_validate(file: &Path) -> Output {
    let python = common::venv::pinned_python("deploy-venv", "deploy/requirements.txt");
    let tool = python.with_file_name("kubernetes-validate");
    Command::new(tool)
        .arg("--strict")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn the_kubernetes_example_validates_and_probes_the_right_endpoints() {
    let file = root().join("deploy/kubernetes/phi4.yaml");
    let out = kubernetes_validate(&file);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in ["deployment/phi4", "service/phi4"] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{text}"
        );
    }
    let yaml = std::fs::read_to_string(&file).unwrap();
    // Liveness on /health, readiness on /ready: the routes phi4 serve answers.
    let live = yaml.find("livenessProbe:").unwrap();
    let ready = yaml.find("readinessProbe:").unwrap();
    assert!(yaml[live..ready].contains("path: /health"));
    assert!(yaml[ready..].contains("path: /ready"));

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("phi4.yaml");
    std::fs::write(
        &broken,
        yaml.replace("containerPort: 8080", "containerPort: http-port"),
    )
    .unwrap();
    assert!(
        !kubernetes_validate(&broken).status.success(),
        "kubernetes-validate accepted a broken manifest"
    );
}
