//! `phi4 serve`'s life over real sockets, with a scripted engine whose generations run until
//! they are stopped: answering while the model loads, the drain on a shutdown signal, the
//! request time limit, the header / body / keep-alive timeouts and the connection cap.
//! tests/openai_sdk.rs sends the real SIGTERM to the real binary.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use common::raw::{self, connect, read_until, request, request_text, send, time_to_close};
use phi4::engine::{Event, FinishReason, Request, Step, SubmitError};
use phi4::server::connection::ConnectionLimits;
use phi4::server::lifecycle::{run, Shutdown};
use phi4::server::{router, Backend, ListenConfig, ServerOptions, ServerStatus};
use phi4::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// One token ("a") every 5 ms until `max_tokens` or until the receiver is dropped; `live`
/// counts the generations still running (a cancelled request must bring it back to 0).
#[derive(Default)]
struct Endless {
    live: Arc<AtomicUsize>,
}

impl Backend for Endless {
    fn max_model_len(&self) -> usize {
        100_000
    }

    fn render_chat(&self, messages: &[Message], _: Option<&[Value]>) -> anyhow::Result<String> {
        Ok(messages.iter().map(|m| m.content.clone()).collect())
    }

    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(&self, ids: &[u32]) -> anyhow::Result<String> {
        Ok(ids.iter().map(|&i| i as u8 as char).collect())
    }

    fn check(&self, _: &Request) -> anyhow::Result<()> {
        Ok(())
    }

    fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let (tx, rx) = unbounded_channel();
        let live = self.live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || {
            let _ = tx.send(Event::Started);
            for i in 0..req.params.max_tokens {
                std::thread::sleep(Duration::from_millis(5));
                let finish = (i + 1 == req.params.max_tokens).then_some(FinishReason::Length);
                let step = Step {
                    token: 97,
                    text: "a".into(),
                    logprob: None,
                    finish,
                };
                if tx.send(Event::Step(step)).is_err() {
                    break;
                }
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(rx)
    }

    fn load(&self) -> (usize, usize) {
        (0, self.live.load(Ordering::SeqCst))
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    addr: String,
    stop: UnboundedSender<&'static str>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    model: Option<tokio::sync::oneshot::Sender<anyhow::Result<Router>>>,
    live: Arc<AtomicUsize>,
    opts: ServerOptions,
}

impl Harness {
    /// A server on a free port; with `loaded` false it waits for [`Harness::finish_loading`].
    fn start(listen: ListenConfig, mut opts: ServerOptions, loaded: bool) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        if !loaded {
            opts.status = Arc::new(ServerStatus::loading());
        }
        let (stop, shutdown) = Shutdown::channel();
        let (model_tx, model_rx) = tokio::sync::oneshot::channel();
        let status = opts.status.clone();
        let done = rt.spawn(run(listener, listen, status, model_rx, || {}, shutdown));
        let mut h = Harness {
            rt,
            addr,
            stop,
            done: Some(done),
            model: Some(model_tx),
            live: Arc::default(),
            opts,
        };
        if loaded {
            h.finish_loading();
        }
        h
    }

    fn finish_loading(&mut self) {
        let backend = Arc::new(Endless {
            live: self.live.clone(),
        });
        let app = router(backend, self.opts.clone());
        let _ = self.model.take().unwrap().send(Ok(app));
    }

    /// Sends the shutdown signal; `wait_stopped` then says how long the drain took.
    fn shut_down(&self) {
        self.stop.send("test signal").unwrap();
    }

    fn wait_stopped(&mut self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        let done = self.done.take().unwrap();
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(limit, done).await })
            .expect("the server did not stop in time")
            .unwrap();
        r.expect("the server stopped with an error");
        t0.elapsed()
    }

    /// Waits for every generation to have stopped (the engine's work freed).
    fn wait_idle_engine(&self) {
        let t0 = Instant::now();
        while self.live.load(Ordering::SeqCst) > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "generations still running"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn listen(f: impl FnOnce(&mut ListenConfig)) -> ListenConfig {
    let mut c = ListenConfig {
        limits: ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(10),
        },
        max_connections: 64,
        shutdown_timeout: Duration::from_secs(10),
    };
    f(&mut c);
    c
}

fn chat(stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "go"}], "stream": stream})
}

/// A finished stream: its last event is [DONE], and before it each choice's final chunk.
fn assert_ended_cleanly(r: &raw::Response, reason: &str) -> usize {
    assert_eq!(r.status, 200, "{r:?}");
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], reason, "{last}");
    chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"] == "a")
        .count()
}

#[test]
fn health_answers_while_the_model_loads_and_ready_follows_the_load() {
    let mut h = Harness::start(listen(|_| {}), ServerOptions::default(), false);
    h.opts.status.set_load_progress(1 << 20, 4 << 20);
    let health = request(&h.addr, "GET", "/health", None);
    assert_eq!(health.status, 200);
    let v = health.json();
    assert_eq!(
        (v["status"].clone(), v["loading"].clone()),
        (json!("ok"), json!(true))
    );
    assert_eq!(v["progress"], 0.25);
    let ready = request(&h.addr, "GET", "/ready", None);
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (503, json!("loading"))
    );
    let early = request(&h.addr, "POST", "/v1/chat/completions", Some(&chat(false)));
    assert_eq!(early.status, 503);
    assert_eq!(early.header("retry-after").as_deref(), Some("5"));
    assert!(early.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("loading"));

    h.finish_loading();
    let t0 = Instant::now();
    while request(&h.addr, "GET", "/ready", None).status != 200 {
        assert!(t0.elapsed() < Duration::from_secs(5), "never became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = request(&h.addr, "GET", "/ready", None).json();
    assert_eq!(ready["status"], "ready");
    let models = request(&h.addr, "GET", "/v1/models", None);
    assert_eq!(models.status, 200);
    h.shut_down();
    h.wait_stopped(Duration::from_secs(5));
}

#[test]
fn a_drain_ends_open_streams_with_a_finish_reason_and_done() {
    let mut h = Harness::start(
        listen(|c| c.shutdown_timeout = Duration::from_millis(400)),
        ServerOptions::default(),
        true,
    );
    // Four streams that would run for minutes, each past its first token.
    let mut streams: Vec<_> = (0..4)
        .map(|_| {
            let mut s = connect(&h.addr);
            send(
                &mut s,
                &request_text("POST", "/v1/chat/completions", Some(&chat(true)), true),
            );
            let got = read_until(&mut s, "\"content\":\"a\"");
            (s, got)
        })
        .collect();
    // A short request in flight at the signal finishes normally.
    let mut short = connect(&h.addr);
    let mut body = chat(false);
    body["max_tokens"] = json!(40);
    send(
        &mut short,
        &request_text("POST", "/v1/chat/completions", Some(&body), true),
    );
    std::thread::sleep(Duration::from_millis(20));
    let t0 = Instant::now();
    h.shut_down();
    // Draining: not ready, still alive, no new work.
    std::thread::sleep(Duration::from_millis(50));
    let ready = request(&h.addr, "GET", "/ready", None);
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (503, json!("draining"))
    );
    assert_eq!(request(&h.addr, "GET", "/health", None).status, 200);
    let refused = request(&h.addr, "POST", "/v1/chat/completions", Some(&chat(false)));
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());

    let short = raw::read_until_closed(&mut short);
    assert_eq!(short.status, 200);
    let v = short.json();
    assert_eq!(v["choices"][0]["message"]["content"], "a".repeat(40));
    assert_eq!(short.header("connection").as_deref(), Some("close"));
    for (s, mut got) in streams.drain(..) {
        let mut s = s;
        let rest = raw::read_until_closed_raw(&mut s);
        got.extend(rest);
        let r = raw::parse(&got);
        let tokens = assert_ended_cleanly(&r, "length");
        assert!(tokens >= 1, "{r:?}");
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(380),
        "streams ended before the shutdown timeout: {took:?}"
    );
    h.wait_stopped(Duration::from_secs(8));
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        t0.elapsed()
    );
    h.wait_idle_engine();
}

#[test]
fn the_request_time_limit_ends_generations_as_length() {
    let opts = ServerOptions {
        request_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let mut h = Harness::start(listen(|_| {}), opts, true);
    let t0 = Instant::now();
    let streamed = request(&h.addr, "POST", "/v1/chat/completions", Some(&chat(true)));
    let tokens = assert_ended_cleanly(&streamed, "length");
    assert!(tokens >= 1 && t0.elapsed() < Duration::from_secs(5));
    let whole = request(&h.addr, "POST", "/v1/chat/completions", Some(&chat(false)));
    assert_eq!(whole.status, 200);
    let v = whole.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..1000).contains(&n), "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "a".repeat(n as usize)
    );
    let legacy = json!({"prompt": "go", "max_tokens": 50000, "stream": true});
    let legacy = request(&h.addr, "POST", "/v1/completions", Some(&legacy));
    let events = legacy.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    h.wait_idle_engine();
    h.shut_down();
    h.wait_stopped(Duration::from_secs(5));
}

#[test]
fn slow_headers_and_slow_bodies_are_cut_off_while_others_are_served() {
    let opts = ServerOptions {
        body_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let mut h = Harness::start(
        listen(|c| c.limits.header_timeout = Duration::from_millis(400)),
        opts,
        true,
    );
    let mut slow_head = connect(&h.addr);
    send(
        &mut slow_head,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: te",
    );
    let mut slow_body = connect(&h.addr);
    send(
        &mut slow_body,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: 200\r\n\r\n{\"messages\": [",
    );
    // Meanwhile an ordinary client is served at once.
    let t0 = Instant::now();
    let models = request(&h.addr, "GET", "/v1/models", None);
    assert_eq!(models.status, 200);
    assert!(t0.elapsed() < Duration::from_millis(300));

    let (after, sent) = time_to_close(&mut slow_head, Duration::from_secs(5))
        .expect("a client stalled mid-header was never disconnected");
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}, before its timeout"
    );
    let (after, sent) = time_to_close(&mut slow_body, Duration::from_secs(5))
        .expect("a client stalled mid-body was never disconnected");
    let r = raw::parse(&sent);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("did not arrive"));
    assert!(after < Duration::from_secs(3));
    h.shut_down();
    h.wait_stopped(Duration::from_secs(5));
}

#[test]
fn idle_keep_alive_connections_close_and_busy_ones_stay() {
    let mut h = Harness::start(
        listen(|c| c.limits.keep_alive_timeout = Duration::from_millis(400)),
        ServerOptions::default(),
        true,
    );
    let mut busy = connect(&h.addr);
    let mut idle = connect(&h.addr);
    send(&mut idle, &request_text("GET", "/health", None, true));
    assert_eq!(raw::read_one(&mut idle).status, 200);
    // `busy` sends a request every 150 ms for over a second: never idle for 400 ms.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        send(&mut busy, &request_text("GET", "/health", None, true));
        assert_eq!(raw::read_one(&mut busy).status, 200);
        std::thread::sleep(Duration::from_millis(150));
    }
    // `idle` was closed meanwhile.
    let (_, sent) = time_to_close(&mut idle, Duration::from_millis(100))
        .expect("an idle keep-alive connection stayed open");
    assert!(sent.is_empty());
    let (after, _) = time_to_close(&mut busy, Duration::from_secs(5)).expect("never closed");
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );
    h.shut_down();
    h.wait_stopped(Duration::from_secs(5));
}

#[test]
fn connections_beyond_the_cap_get_503_with_retry_after() {
    let mut h = Harness::start(
        listen(|c| c.max_connections = 2),
        ServerOptions::default(),
        true,
    );
    let mut first = connect(&h.addr);
    send(&mut first, &request_text("GET", "/health", None, true));
    assert_eq!(raw::read_one(&mut first).status, 200);
    let mut second = connect(&h.addr);
    send(&mut second, &request_text("GET", "/health", None, true));
    assert_eq!(raw::read_one(&mut second).status, 200);
    let over = request(&h.addr, "GET", "/health", None);
    assert_eq!(over.status, 503, "{over:?}");
    assert_eq!(over.header("retry-after").as_deref(), Some("1"));
    assert!(over.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("connections"));
    drop(first);
    let t0 = Instant::now();
    while request(&h.addr, "GET", "/health", None).status != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a freed slot was never reused"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.shut_down();
    h.wait_stopped(Duration::from_secs(5));
}
