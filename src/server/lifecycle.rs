//! The server's life: listen at once (so `/health` answers while the model loads), accept up to
//! `max_connections`, and on SIGTERM or SIGINT drain: take no new work, report not ready, let
//! requests finish for up to the shutdown timeout, then end the ones still running (streams get
//! their final chunk and `[DONE]`) and return. A second signal exits at once.
//!
//! While draining, the port still answers, but only with 503s (`/ready` says "draining",
//! `/health` stays 200): probes and balancers see the replica leave instead of a refused
//! connection, which some balancers count as a failure of the whole backend.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Result};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::connection::{self, ConnectionLimits};
use super::error::ApiError;

/// What the routes and the listener share about the server's state.
#[derive(Debug)]
pub struct ServerStatus {
    loaded: AtomicBool,
    draining: AtomicBool,
    /// Set when running requests must end now (the drain's time is up).
    end_requests: watch::Sender<bool>,
    connections: AtomicUsize,
    load_done: AtomicU64,
    load_total: AtomicU64,
}

impl Default for ServerStatus {
    /// A server whose model is already loaded (an application built around a loaded engine).
    fn default() -> Self {
        ServerStatus {
            loaded: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            end_requests: watch::channel(false).0,
            connections: AtomicUsize::new(0),
            load_done: AtomicU64::new(0),
            load_total: AtomicU64::new(0),
        }
    }
}

impl ServerStatus {
    /// A server still loading its model.
    pub fn loading() -> ServerStatus {
        let s = ServerStatus::default();
        s.loaded.store(false, Ordering::SeqCst);
        s
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Bytes of weights read so far, of how many (0 of 0 when the loader does not say).
    pub fn set_load_progress(&self, done: u64, total: u64) {
        self.load_total.store(total, Ordering::Relaxed);
        self.load_done.store(done, Ordering::Relaxed);
    }

    /// Fraction of the weights loaded, when known.
    pub fn load_progress(&self) -> Option<f64> {
        let total = self.load_total.load(Ordering::Relaxed);
        let done = self.load_done.load(Ordering::Relaxed);
        (total > 0).then(|| (done as f64 / total as f64).min(1.0))
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Resolves once running requests must end.
    pub fn requests_must_end(&self) -> watch::Receiver<bool> {
        self.end_requests.subscribe()
    }

    /// Ends every running request now (what the drain does when its time is up).
    pub fn end_running_requests(&self) {
        self.end_requests.send_replace(true);
    }
}

/// The listener's limits (`phi4 serve` flags).
#[derive(Debug, Clone, Copy)]
pub struct ListenConfig {
    pub limits: ConnectionLimits,
    /// Connections served at once; beyond, a new one gets 503 with Retry-After and is closed.
    pub max_connections: usize,
    /// How long a drain waits for running requests before ending them.
    pub shutdown_timeout: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            limits: ConnectionLimits {
                header_timeout: Duration::from_secs(10),
                keep_alive_timeout: Duration::from_secs(75),
            },
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// After the drain has ended the running requests: time for their last bytes to go out.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Answers while the model loads or the server drains: `/health` (live; the load's progress),
/// `/ready` (503) and 503 with Retry-After for everything else.
fn standby_app(status: Arc<ServerStatus>) -> Router {
    fn state(s: &ServerStatus) -> serde_json::Value {
        let progress = s.load_progress().map(|p| (p * 1000.0).round() / 1000.0);
        let what = if s.is_draining() {
            "draining"
        } else {
            "loading"
        };
        json!({"status": what, "ready": false, "loading": !s.is_loaded(), "progress": progress})
    }
    let (s1, s2, s3) = (status.clone(), status.clone(), status);
    Router::new()
        .route(
            "/health",
            get(move || async move {
                let mut v = state(&s1);
                v["status"] = json!("ok");
                Json(v)
            }),
        )
        .route(
            "/ready",
            get(move || async move { (StatusCode::SERVICE_UNAVAILABLE, Json(state(&s2))) }),
        )
        .fallback(move || async move {
            let (msg, wait) = if s3.is_draining() {
                (
                    "the server is shutting down; send the request to another replica",
                    1,
                )
            } else {
                ("the model is still loading; retry shortly", 5)
            };
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", msg);
            e.retry_after = Some(wait);
            e.into_response()
        })
}

/// What a connection over the cap gets.
fn full_app() -> Router {
    Router::new().fallback(|| async {
        let mut r: Response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server has too many open connections; retry shortly",
        )
        .into_response();
        let h = r.headers_mut();
        h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    })
}

/// What starts the drain: SIGTERM and SIGINT, or (embedding, tests) a channel.
pub struct Shutdown(Trigger);

enum Trigger {
    #[cfg(unix)]
    Os {
        term: tokio::signal::unix::Signal,
        int: tokio::signal::unix::Signal,
    },
    #[cfg(not(unix))]
    CtrlC,
    Channel(tokio::sync::mpsc::UnboundedReceiver<&'static str>),
}

impl Shutdown {
    /// SIGTERM (what systemd, Docker and Kubernetes send) and SIGINT (Ctrl-C).
    pub fn on_signals() -> Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Shutdown(Trigger::Os {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            }))
        }
        #[cfg(not(unix))]
        Ok(Shutdown(Trigger::CtrlC))
    }

    /// Each message sent starts the drain (the first) or exits at once (the second).
    pub fn channel() -> (tokio::sync::mpsc::UnboundedSender<&'static str>, Shutdown) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, Shutdown(Trigger::Channel(rx)))
    }

    /// The trigger's name and the exit status a shell gives a process it kills.
    async fn next(&mut self) -> (&'static str, i32) {
        match &mut self.0 {
            #[cfg(unix)]
            Trigger::Os { term, int } => tokio::select! {
                _ = term.recv() => ("SIGTERM", 143),
                _ = int.recv() => ("SIGINT", 130),
            },
            #[cfg(not(unix))]
            Trigger::CtrlC => {
                let _ = tokio::signal::ctrl_c().await;
                ("Ctrl-C", 130)
            }
            Trigger::Channel(rx) => match rx.recv().await {
                Some(name) => (name, 1),
                None => std::future::pending().await,
            },
        }
    }
}

/// Serves until a signal's drain is over (Ok) or the model fails to load (the loader's error).
/// `model` delivers the application once the model is loaded; `on_ready` runs then.
pub async fn run(
    listener: TcpListener,
    cfg: ListenConfig,
    status: Arc<ServerStatus>,
    mut model: oneshot::Receiver<Result<Router>>,
    on_ready: impl FnOnce() + Send,
    mut signals: Shutdown,
) -> Result<()> {
    let app: Arc<OnceLock<Router>> = Arc::new(OnceLock::new());
    // Serves while the model loads and, later, the connections that arrive during the drain.
    let standby = standby_app(status.clone());
    let full = full_app();
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut on_ready = Some(on_ready);
    let mut waiting_for_model = true;
    let (signal, exit_code) = loop {
        tokio::select! {
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let drain = drain_rx.clone();
                    let limits = cfg.limits;
                    if status.connections.fetch_add(1, Ordering::SeqCst) >= cfg.max_connections {
                        status.connections.fetch_sub(1, Ordering::SeqCst);
                        let full = full.clone();
                        let app = move || full.clone();
                        tokio::spawn(connection::serve(stream, app, limits, false, drain));
                        continue;
                    }
                    let (app, standby, status) = (app.clone(), standby.clone(), status.clone());
                    tokio::spawn(async move {
                        let current = move || app.get().cloned().unwrap_or_else(|| standby.clone());
                        connection::serve(stream, current, limits, true, drain).await;
                        status.connections.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                // Out of file descriptors, most likely: let connections close, then go on.
                Err(e) => {
                    eprintln!("phi4 serve: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            loaded = &mut model, if waiting_for_model => {
                waiting_for_model = false;
                match loaded {
                    Ok(Ok(router)) => {
                        let _ = app.set(router);
                        status.loaded.store(true, Ordering::SeqCst);
                        if let Some(f) = on_ready.take() {
                            f();
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(anyhow!("the model loader stopped without a result")),
                }
            }
            s = signals.next() => break s,
        }
    };
    status.draining.store(true, Ordering::SeqCst);
    drain_tx.send_replace(true);
    eprintln!(
        "phi4 serve: {signal}: draining {} connection(s) for up to {:?} (a second signal exits now)",
        status.open_connections(),
        cfg.shutdown_timeout
    );
    tokio::spawn(async move {
        let (again, _) = signals.next().await;
        eprintln!("phi4 serve: {again} again: exiting now");
        std::process::exit(exit_code);
    });
    let drained = async {
        if !wait_closed(&status, cfg.shutdown_timeout).await {
            eprintln!(
                "phi4 serve: shutdown timeout: ending the requests of {} connection(s)",
                status.open_connections()
            );
            status.end_running_requests();
            wait_closed(&status, FINAL_FLUSH).await;
        }
    };
    tokio::pin!(drained);
    // These answer one request with a 503 and close; a drain signal would close them unread.
    let (_keep, not_draining) = watch::channel(false);
    loop {
        tokio::select! {
            _ = &mut drained => break,
            acc = listener.accept() => if let Ok((stream, _)) = acc {
                let standby = standby.clone();
                let app = move || standby.clone();
                tokio::spawn(connection::serve(stream, app, cfg.limits, false, not_draining.clone()));
            },
        }
    }
    eprintln!("phi4 serve: stopped");
    Ok(())
}

/// Whether every connection closed within `limit`.
async fn wait_closed(status: &ServerStatus, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while status.open_connections() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
