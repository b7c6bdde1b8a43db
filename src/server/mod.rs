//! The OpenAI-compatible HTTP server (`phi4 serve`). HTTP, validation and templating live here;
//! the engine is seen only through [`Backend`], so HTTP behaviour is testable with a scripted
//! backend and no model.

mod body;
pub mod connection;
pub mod cut;
pub mod error;
pub mod lifecycle;
pub mod log;
pub mod metrics;
pub mod openai;
mod routes;
mod speech;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::speech::WindowOutput;
use crate::engine::{
    Batcher, Engine, Event, MediaInput, Request, SpeechOptions, SubmitError, Transcript,
};
use crate::text::{AudioSource, Message};
pub use error::ApiError;
pub use lifecycle::{ListenConfig, ServerStatus};
pub use log::{LogFormat, LogOptions};
use metrics::Metrics;

/// What the server needs from an engine.
pub trait Backend: Send + Sync + 'static {
    /// Longest prompt plus output, in tokens.
    fn max_model_len(&self) -> usize;
    fn render_chat(&self, messages: &[Message], tools: Option<&[Value]>) -> anyhow::Result<String>;
    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>>;
    /// A chat's prompt ids and its images and audios made ready for the decoder. A backend
    /// without media support refuses messages that carry them.
    fn encode_chat(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
    ) -> anyhow::Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        if messages
            .iter()
            .any(|m| !m.images.is_empty() || !m.audios.is_empty())
        {
            anyhow::bail!(
                "this model takes text only; images and audio need a Phi-4-multimodal checkpoint"
            );
        }
        let prompt = self.render_chat(messages, tools)?;
        Ok((self.tokenize(&prompt)?, None))
    }
    fn detokenize(&self, ids: &[u32]) -> anyhow::Result<String>;
    /// Rejects what the engine could not run (bad ids, a grammar that does not compile…).
    fn check(&self, req: &Request) -> anyhow::Result<()>;
    /// Queues a request; dropping the receiver cancels it.
    fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError>;
    /// (waiting, running) sequences.
    fn load(&self) -> (usize, usize);
    /// Runs a speech task over an audio file's bytes, its windows through the batcher. Blocks;
    /// call it off the async workers.
    /// At `cut` (the request's time limit, or the drain's end) the windows still running end
    /// with what they have, and windows not yet started are skipped.
    fn transcribe(
        &self,
        audio: Vec<u8>,
        opts: &SpeechOptions,
        cut: cut::Cut,
    ) -> Result<Transcript, ApiError> {
        let _ = (audio, opts, cut);
        Err(ApiError::invalid(
            "this model takes text only; audio needs a Phi-4-multimodal checkpoint",
        ))
    }
}

/// The real engine behind the continuous batcher.
pub struct EngineBackend {
    pub batcher: Batcher,
}

impl Backend for EngineBackend {
    fn max_model_len(&self) -> usize {
        self.batcher.engine.max_model_len
    }

    fn render_chat(&self, messages: &[Message], tools: Option<&[Value]>) -> anyhow::Result<String> {
        self.batcher.engine.render_chat(messages, tools)
    }

    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        self.batcher.engine.tokenizer.encode(text)
    }

    fn encode_chat(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
    ) -> anyhow::Result<(Vec<u32>, Option<Arc<MediaInput>>)> {
        self.batcher.engine.encode_chat(messages, tools)
    }

    fn detokenize(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.batcher.engine.tokenizer.decode(ids, true)
    }

    fn check(&self, req: &Request) -> anyhow::Result<()> {
        let engine = &self.batcher.engine;
        engine.check_request(req)?;
        if let Some(g) = &req.grammar {
            engine.constraint_factory()?.constraint(g)?;
        }
        Ok(())
    }

    fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        self.batcher.submit(req)
    }

    fn load(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        let s = &self.batcher.stats;
        (
            s.waiting.load(Ordering::SeqCst),
            s.running.load(Ordering::SeqCst),
        )
    }

    fn transcribe(
        &self,
        audio: Vec<u8>,
        opts: &SpeechOptions,
        cut: cut::Cut,
    ) -> Result<Transcript, ApiError> {
        let engine = &self.batcher.engine;
        let wave = engine
            .load_audio(&AudioSource::Bytes(Arc::new(audio)))
            .map_err(|e| ApiError::param("file", format!("{e:#}")))?;
        // The engine's errors are about the request (prompt too long for the context, …); the
        // batcher's are the server's state.
        let mut server_error: Option<ApiError> = None;
        let result = engine.transcribe_with(&wave, opts, &mut |requests| {
            if cut.is_reached() {
                return Ok(vec![WindowOutput::default(); requests.len()]);
            }
            // All of a group's windows go in at once, so the batcher decodes them together.
            let mut rxs = Vec::with_capacity(requests.len());
            for req in requests {
                engine.check_request(&req)?;
                match self.batcher.submit(req) {
                    Ok(rx) => rxs.push(rx),
                    Err(SubmitError::QueueFull) => {
                        server_error = Some(ApiError::overloaded());
                        anyhow::bail!("queue full");
                    }
                    Err(SubmitError::Stopped) => {
                        server_error = Some(ApiError::internal("the engine has stopped"));
                        anyhow::bail!("stopped");
                    }
                }
            }
            let mut outs = Vec::with_capacity(rxs.len());
            for mut rx in rxs {
                let mut out = WindowOutput::default();
                // At the cut the loop ends: the window keeps what it has, and dropping `rx`
                // frees its sequence.
                while let Some(ev) = recv_until(&mut rx, &cut) {
                    match ev {
                        Some(Event::Started) => {}
                        Some(Event::Step(s)) => {
                            out.tokens.push(s.token);
                            out.text.push_str(&s.text);
                            if let Some(l) = &s.logprob {
                                out.logprobs.push(l.logprob);
                            }
                            if s.finish.is_some() {
                                break;
                            }
                        }
                        Some(Event::Error(e)) => {
                            server_error = Some(ApiError::internal(e.clone()));
                            anyhow::bail!("{e}");
                        }
                        None => {
                            server_error =
                                Some(ApiError::internal("the engine dropped the request"));
                            anyhow::bail!("dropped");
                        }
                    }
                }
                outs.push(out);
            }
            Ok(outs)
        });
        match (result, server_error) {
            (Ok(t), _) => Ok(t),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(ApiError::invalid(format!("{e:#}"))),
        }
    }
}

/// The next event of a speech window, from a blocking thread: `None` once `cut` is reached
/// (after the events already queued).
fn recv_until(rx: &mut UnboundedReceiver<Event>, cut: &cut::Cut) -> Option<Option<Event>> {
    if let Ok(ev) = rx.try_recv() {
        return Some(Some(ev));
    }
    if cut.is_reached() {
        return None;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(async {
            tokio::select! {
                ev = rx.recv() => Some(ev),
                _ = cut.clone().reached() => None,
            }
        }),
        Err(_) => Some(rx.blocking_recv()),
    }
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The id `/v1/models` lists and requests must name.
    pub model_id: String,
    /// Accepted Bearer keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Names of the LoRA adapters the backend carries (`--lora-modules NAME=DIR`), by adapter
    /// id: a request whose `model` is one of them runs with that adapter.
    pub lora_modules: Vec<String>,
    /// The batcher's queue limit: at it, `/ready` says the server is overloaded.
    pub max_queue: usize,
    /// Longest a request may run (prompt, queue and generation); at it the request ends as if
    /// `max_tokens` were reached (`finish_reason: "length"`, the text so far). None: no limit.
    pub request_timeout: Option<Duration>,
    /// Longest a request body may take to arrive (408 and the connection closed beyond).
    pub body_timeout: Duration,
    pub log: LogOptions,
    /// Loading, draining and the listener's figures, shared with [`lifecycle::run`].
    pub status: Arc<ServerStatus>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "phi4".into(),
            api_keys: Vec::new(),
            max_body_bytes: 4 << 20,
            lora_modules: Vec::new(),
            max_queue: 256,
            request_timeout: None,
            body_timeout: Duration::from_secs(120),
            log: LogOptions::default(),
            status: Arc::new(ServerStatus::default()),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub opts: Arc<ServerOptions>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
}

/// The application: `/v1/*` (behind the API keys, if any), `/health` (liveness), `/ready`
/// (readiness), `/metrics`.
pub fn router(backend: Arc<dyn Backend>, opts: ServerOptions) -> Router {
    let state = AppState {
        backend,
        metrics: Arc::new(Metrics::default()),
        created: unix_now(),
        opts: Arc::new(opts),
    };
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/audio/transcriptions", post(speech::transcriptions))
        .route("/v1/audio/translations", post(speech::translations))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|req: HttpRequest| async move {
            ApiError::not_found(format!(
                "no route for {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .method_not_allowed_fallback(|req: HttpRequest| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn authenticate(State(st): State<AppState>, req: HttpRequest, next: Next) -> Response {
    if st.opts.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
        .as_bytes();
    // Compare against every key without stopping early, each in constant time.
    let mut ok = subtle::Choice::from(0);
    for key in &st.opts.api_keys {
        ok |= key.as_bytes().ct_eq(given);
    }
    if bool::from(ok) {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Counts the request, gives it an id (the client's `X-Request-Id` if sane, echoed back), and
/// writes its log line once its response is done.
async fn observe(State(st): State<AppState>, mut req: HttpRequest, next: Next) -> Response {
    let start = Instant::now();
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| routes::new_id("req-"));
    let fields = log::RequestLog::default();
    req.extensions_mut().insert(fields.clone());
    let mut r = next.run(req).await;
    let endpoint = match path.as_str() {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/models"
        | "/v1/audio/transcriptions"
        | "/v1/audio/translations"
        | "/health"
        | "/ready"
        | "/metrics" => path.as_str(),
        _ => "other",
    };
    st.metrics.count_request(endpoint, r.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-request-id", v);
    }
    // Probes and scrapes come every few seconds; a line each would bury the requests.
    if st.opts.log.format == LogFormat::Off || !path.starts_with("/v1/") {
        return r;
    }
    let line = log::Line {
        format: st.opts.log.format,
        id,
        method,
        path,
        status: r.status().as_u16(),
        error: r
            .extensions()
            .get::<log::LoggedError>()
            .map(|e| e.0.clone()),
        start,
        fields,
    };
    r.map(|b| body::OnDrop::wrap(b, line))
}

/// Reads the whole request body within the body timeout (408 beyond, and the connection is
/// closed) and the size limit (413), before any handler runs: a slow upload holds no handler.
async fn read_body(State(st): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = st.opts.max_body_bytes;
    let read = tokio::time::timeout(st.opts.body_timeout, axum::body::to_bytes(body, limit));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(HttpRequest::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "request body is larger than the server accepts",
                )
                .into_response()
            } else {
                ApiError::invalid(format!("reading the request body failed: {e}")).into_response()
            }
        }
        Err(_) => {
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    st.opts.body_timeout.as_secs_f64()
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Liveness: the process answers (also while it drains, so it is not killed mid-drain).
async fn health(State(st): State<AppState>) -> Response {
    let s = &st.opts.status;
    axum::Json(serde_json::json!({
        "status": "ok",
        "ready": s.is_loaded() && !s.is_draining(),
        "draining": s.is_draining(),
    }))
    .into_response()
}

/// Readiness: loaded, not draining, and the queue below its limit; 503 otherwise.
async fn ready(State(st): State<AppState>) -> Response {
    let s = &st.opts.status;
    let (waiting, running) = st.backend.load();
    let state = if !s.is_loaded() {
        "loading"
    } else if s.is_draining() {
        "draining"
    } else if waiting >= st.opts.max_queue {
        "overloaded"
    } else {
        "ready"
    };
    let status = if state == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"status": state, "waiting": waiting, "running": running});
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    let (waiting, running) = st.backend.load();
    st.metrics.queue_depth.set(waiting as i64);
    st.metrics.running.set(running as i64);
    let s = &st.opts.status;
    st.metrics.open_connections.set(s.open_connections() as i64);
    st.metrics
        .ready
        .set(i64::from(s.is_loaded() && !s.is_draining()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Wraps an engine in a batcher and the HTTP application.
pub fn engine_router(
    engine: Arc<Engine>,
    batch: crate::engine::BatcherConfig,
    opts: ServerOptions,
) -> Router {
    let batcher = Batcher::spawn(engine, batch);
    router(Arc::new(EngineBackend { batcher }), opts)
}
