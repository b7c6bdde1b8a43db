//! `phi4 serve` on the tiny fixture model, driven by real clients: the official openai Python
//! SDK (tests/openai_sdk/client_test.py, installed into target/openai-sdk-venv on first use),
//! and a raw socket that walks away mid-stream.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tiny_dir;

const KEY: &str = "sk-phi4-test";
const MODEL: &str = "tiny-phi4";

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    start_server_for(&tiny_dir())
}

fn start_server_for(model: &Path) -> Server {
    start_server_with(model, &[]).0
}

/// `phi4 serve` on `model` with `extra` flags, once it says it is ready; its stderr lines as
/// they come.
fn start_server_with(model: &Path, extra: &[&str]) -> (Server, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phi4"))
        .args(["serve", "--model"])
        .arg(model)
        .args([
            "--port",
            "0",
            "--served-model-name",
            MODEL,
            "--api-key",
            KEY,
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting phi4 serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(Vec::new()));
    let addr = loop {
        let line = lines
            .next()
            .expect("phi4 serve exited before it was ready")
            .unwrap();
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split("ready on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (Server { child, addr }, log)
}

/// A Python with the pinned openai SDK, made on first use.
fn sdk_python() -> PathBuf {
    // Two tests of this binary use the SDK: the first makes the venv, the other waits for it
    // (two pip installs into one venv at once fail).
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(make_sdk_python).clone()
}

fn make_sdk_python() -> PathBuf {
    common::venv::pinned_python("openai-sdk-venv", "tests/openai_sdk/requirements.txt")
}

/// Runs `tests/openai_sdk/{script}` with the SDK against a server for `model` (the text
/// fixture by default), with `env` added to the usual base URL, key and model name; asserts it
/// printed its "0 failed" summary.
fn run_sdk_script(script: &str, model: Option<&Path>, env: &[(&str, String)]) {
    let python = sdk_python();
    let server = match model {
        Some(m) => start_server_for(m),
        None => start_server(),
    };
    let mut cmd = Command::new(python);
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/openai_sdk")
            .join(script),
    )
    .env("PHI4_BASE_URL", format!("http://{}/v1", server.addr))
    .env("PHI4_API_KEY", KEY)
    .env("PHI4_MODEL", MODEL);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{stdout}");
    assert!(stdout.contains(" 0 failed"));
}

#[test]
fn openai_python_sdk_against_phi4_serve() {
    run_sdk_script("client_test.py", None, &[]);
}

#[test]
fn openai_python_sdk_sends_images() {
    let r = common::Reference::load_named("tiny-phi4mm");
    let dir = tempfile::tempdir().unwrap();
    let img = common::pattern_image(500, 300);
    let png = dir.path().join("image.png");
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data)
        .unwrap()
        .save(&png)
        .unwrap();
    let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
    let expect = e
        .tokenizer
        .decode(&r.ids_at(&["modes", "image", "greedy_ids"]), true)
        .unwrap();
    let prompt_tokens = r.ids_at(&["modes", "image", "prompt_ids"]).len();
    run_sdk_script(
        "image_test.py",
        Some(&common::tiny_mm_dir()),
        &[
            ("PHI4_IMAGE", png.display().to_string()),
            ("PHI4_EXPECT", expect),
            ("PHI4_PROMPT_TOKENS", prompt_tokens.to_string()),
        ],
    );
}

#[test]
fn openai_python_sdk_transcribes_and_sends_audio() {
    let r = common::Reference::load_named("tiny-phi4mm");
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("clip.wav");
    std::fs::write(&wav, common::clip_wav(&r, "main")).unwrap();
    let ids = r.ids_at(&["modes", "audio", "greedy_ids"]);
    let e = phi4::Engine::load(&common::tiny_mm_dir()).unwrap();
    let expect = e.tokenizer.decode(&ids, true).unwrap();
    let prompt_tokens = r.ids_at(&["modes", "audio", "prompt_ids"]).len();
    run_sdk_script(
        "audio_test.py",
        Some(&common::tiny_mm_dir()),
        &[
            ("PHI4_AUDIO", wav.display().to_string()),
            ("PHI4_EXPECT", expect),
            (
                "PHI4_EXPECT_IDS",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            ),
            ("PHI4_PROMPT_TOKENS", prompt_tokens.to_string()),
        ],
    );
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn metric(addr: &str, name: &str) -> f64 {
    let mut s = http(addr, "GET", "/metrics", "");
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let server = start_server();
    let body = serde_json::json!({
        "model": MODEL, "stream": true, "max_tokens": 450, "ignore_eos": true,
        "messages": [{"role": "user", "content": "go on forever"}],
    })
    .to_string();
    let mut s = http(&server.addr, "POST", "/v1/chat/completions", &body);
    // Read until a few content chunks have arrived, then hang up.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("\"content\"").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    let t = Instant::now();
    loop {
        if metric(&server.addr, "phi4_running_sequences") == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "sequence kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = metric(&server.addr, "phi4_generation_tokens_total");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&server.addr, "phi4_generation_tokens_total"),
        generated
    );
    assert!(generated < 450.0, "ran to the end: {generated} tokens");
}

/// What systemd, Docker and Kubernetes send: with four streams open, SIGTERM drains (each
/// stream gets a final chunk with a finish reason and `[DONE]`), exits 0, and the request log
/// has a JSON line per request without the prompt's text.
#[test]
fn sigterm_ends_open_streams_cleanly_and_exits_zero() {
    let (mut server, log) = start_server_with(
        &tiny_dir(),
        &["--shutdown-timeout", "0.2", "--log-format", "json"],
    );
    let body = serde_json::json!({
        "model": MODEL, "stream": true, "max_tokens": 400, "ignore_eos": true,
        "messages": [{"role": "user", "content": "zebra-secret"}],
    })
    .to_string();
    let mut streams: Vec<(TcpStream, Vec<u8>)> = (0..4)
        .map(|_| {
            let mut s = http(&server.addr, "POST", "/v1/chat/completions", &body);
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("data: ") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "closed before the first event");
                got.extend_from_slice(&buf[..n]);
            }
            (s, got)
        })
        .collect();
    let t0 = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    for (s, got) in streams.iter_mut() {
        s.read_to_end(got).unwrap();
        let text = String::from_utf8_lossy(got);
        let events: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
        let last: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
        let reason = last["choices"][0]["finish_reason"]
            .as_str()
            .unwrap_or_default();
        assert!(reason == "length" || reason == "stop", "{last}");
    }
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains("phi4 serve: stopped")),
        "{log:#?}"
    );
    let requests: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .collect();
    assert_eq!(requests.len(), 4, "{log:#?}");
    for r in &requests {
        assert_eq!(r["status"], 200);
        assert_eq!(r["path"], "/v1/chat/completions");
        assert_eq!(r["model"], MODEL);
        assert!(r["id"].as_str().unwrap().starts_with("req-"));
        assert!(r["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(r["completion_tokens"].as_u64().unwrap() >= 1);
        assert!(r["ttft_s"].as_f64().is_some() && r["duration_s"].as_f64().is_some());
    }
    assert!(
        !log.iter().any(|l| l.contains("zebra-secret")),
        "prompt text in the log"
    );
}
