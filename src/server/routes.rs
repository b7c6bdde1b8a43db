//! The endpoint handlers: validate, template, submit to the backend, and answer with one JSON
//! body or a server-sent event stream.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, StreamExt};
use rand::RngExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::cut::Cut;
use super::error::ApiError;
use super::log::RequestLog;
use super::openai::{parse, ChatRequest, CompletionRequest, Prompt, SamplingFields, ToolChoice};
use super::AppState;
use crate::engine::{Event, FinishReason, Request, Step, SubmitError, TokenLogprob};
use crate::model::AdapterId;
use crate::text::tool_calls::{ToolCall, ToolCallParser, ToolEvent};

/// The JSON object of a request body; a body over the size limit is a 413.
fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is larger than the server accepts".to_string()
        } else {
            r.body_text()
        };
        ApiError::new(status, "invalid_request_error", msg)
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("request body must be a JSON object"));
    }
    Ok(v)
}

/// The adapter a request's `model` names (`None`: the base model, also when absent), and the
/// name to answer with.
fn check_model(
    st: &AppState,
    model: &Option<String>,
) -> Result<(Option<AdapterId>, String), ApiError> {
    let base = st.opts.model_id.clone();
    match model {
        None => Ok((None, base)),
        Some(m) if m == &base => Ok((None, base)),
        Some(m) => match st.opts.lora_modules.iter().position(|n| n == m) {
            Some(i) => Ok((Some(i), m.clone())),
            None => {
                let mut names = vec![format!("`{base}`")];
                names.extend(st.opts.lora_modules.iter().map(|n| format!("`{n}`")));
                Err(ApiError::not_found(format!(
                    "The model `{m}` does not exist; this server serves {}.",
                    names.join(", ")
                ))
                .code("model_not_found"))
            }
        },
    }
}

/// Output budget: the request's, or whatever the context leaves; an over-long request is a 400.
fn max_tokens(
    st: &AppState,
    prompt_len: usize,
    asked: Option<usize>,
    param: &str,
) -> Result<usize, ApiError> {
    let ctx = st.backend.max_model_len();
    let too_long = |wanted: usize| {
        ApiError::param(
            param,
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested \
                 {wanted} tokens ({prompt_len} in the prompt, {} for the completion). Please \
                 reduce the length of the prompt or of the completion.",
                wanted - prompt_len
            ),
        )
        .code("context_length_exceeded")
    };
    if prompt_len == 0 {
        return Err(ApiError::param(param, "the prompt is empty"));
    }
    if prompt_len >= ctx {
        return Err(too_long(prompt_len + asked.unwrap_or(1)));
    }
    match asked {
        Some(n) if prompt_len + n > ctx => Err(too_long(prompt_len + n)),
        Some(n) => Ok(n),
        None => Ok(ctx - prompt_len),
    }
}

/// Submits `n` copies (seeds advanced per copy so choices differ but stay reproducible).
async fn submit(
    st: &AppState,
    base: &Request,
    n: usize,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    // Compiling a grammar (and, the first time, indexing the vocabulary) is CPU work: keep it
    // off the async workers.
    let (backend, req) = (st.backend.clone(), base.clone());
    tokio::task::spawn_blocking(move || backend.check(&req))
        .await
        .map_err(|e| ApiError::internal(format!("request check failed: {e}")))?
        .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let mut rxs = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = base.clone();
        if let Some(s) = r.params.seed {
            r.params.seed = Some(s.wrapping_add(i as u64));
        }
        match st.backend.submit(r) {
            Ok(rx) => rxs.push(rx),
            // Receivers already taken are dropped here, which cancels those copies.
            Err(SubmitError::QueueFull) => return Err(ApiError::overloaded()),
            Err(SubmitError::Stopped) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the engine has stopped",
                ))
            }
        }
    }
    st.metrics.prompt_tokens.inc_by(base.prompt.len() as u64);
    Ok(rxs)
}

/// One finished choice.
struct Collected {
    text: String,
    tokens: usize,
    finish: FinishReason,
    logprobs: Vec<TokenLogprob>,
    /// Seconds from the request to this choice's first token.
    first_token_s: f64,
}

async fn collect(
    st: &AppState,
    mut rx: UnboundedReceiver<Event>,
    t0: Instant,
    cut: Cut,
) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        tokens: 0,
        finish: FinishReason::Stop,
        logprobs: Vec::new(),
        first_token_s: 0.0,
    };
    let cut = cut.reached();
    tokio::pin!(cut);
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = &mut cut => {
                c.finish = FinishReason::Length;
                return Ok(c);
            }
        };
        match ev {
            Some(Event::Started) => {}
            Some(Event::Step(s)) => {
                if c.tokens == 0 {
                    c.first_token_s = t0.elapsed().as_secs_f64();
                }
                c.tokens += 1;
                st.metrics.generation_tokens.inc();
                c.text.push_str(&s.text);
                c.logprobs.extend(s.logprob);
                if let Some(f) = s.finish {
                    c.finish = f;
                    return Ok(c);
                }
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
}

/// Every choice of a non-streamed request, with the request's timings recorded (time to first
/// token once per request, as the streaming path does) and the completion tokens of all choices.
async fn collect_all(
    st: &AppState,
    rxs: Vec<UnboundedReceiver<Event>>,
    t0: Instant,
    log: &RequestLog,
) -> Result<(Vec<Collected>, usize), ApiError> {
    let all = rxs
        .into_iter()
        .map(|rx| collect(st, rx, t0, Cut::new(st, t0)));
    let all = futures_util::future::join_all(all)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let first = all
        .iter()
        .map(|c| c.first_token_s)
        .fold(f64::INFINITY, f64::min);
    st.metrics.time_to_first_token.observe(first);
    st.metrics.latency.observe(t0.elapsed().as_secs_f64());
    let tokens = all.iter().map(|c| c.tokens).sum();
    log.update(|f| {
        f.completion_tokens = tokens;
        f.first_token_s = first.is_finite().then_some(first);
    });
    Ok((all, tokens))
}

fn finish_str(f: FinishReason, called: bool) -> &'static str {
    match f {
        FinishReason::Stop if called => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

pub(crate) fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let s: String = (0..24)
        .map(|_| {
            let c = rng.random_range(0..36u32);
            char::from_digit(c, 36).unwrap()
        })
        .collect();
    format!("{prefix}{s}")
}

fn tool_call_json(call: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": new_id("call_"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            json!({
                "token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
                "top_logprobs": lp.top.iter()
                    .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

fn sse_json(v: &Value) -> Result<Sse, Infallible> {
    Ok(Sse::default().data(v.to_string()))
}

/// The events of all choices, each tagged with its index, as they come; at the cut, a `None`
/// for each choice still open, and the end.
fn merged(
    rxs: Vec<UnboundedReceiver<Event>>,
    cut: Cut,
) -> BoxStream<'static, (usize, Option<Event>)> {
    struct State {
        events: BoxStream<'static, (usize, Event)>,
        cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        open: Vec<bool>,
        cutting: bool,
    }
    let state = State {
        open: vec![true; rxs.len()],
        events: stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
            stream::unfold(rx, move |mut rx| async move {
                rx.recv().await.map(|e| ((i, e), rx))
            })
            .boxed()
        }))
        .boxed(),
        cut: Box::pin(cut.reached()),
        cutting: false,
    };
    stream::unfold(state, |mut s| async move {
        if !s.cutting {
            tokio::select! {
                ev = s.events.next() => {
                    let (i, e) = ev?;
                    if matches!(&e, Event::Error(_) | Event::Step(Step { finish: Some(_), .. })) {
                        s.open[i] = false;
                    }
                    return Some(((i, Some(e)), s));
                }
                _ = &mut s.cut => {
                    s.cutting = true;
                    // Dropping the receivers cancels the sequences.
                    s.events = stream::empty().boxed();
                }
            }
        }
        let i = s.open.iter().position(|&o| o)?;
        s.open[i] = false;
        Some(((i, None), s))
    })
    .boxed()
}

fn sse_response(events: impl futures_util::Stream<Item = Vec<Value>> + Send + 'static) -> Response {
    let body = events
        .flat_map(|vs| stream::iter(vs.into_iter().map(|v| sse_json(&v))))
        .chain(stream::once(async { Ok(Sse::default().data("[DONE]")) }));
    axum::response::Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn chat_completions(
    State(st): State<AppState>,
    Extension(log): Extension<RequestLog>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let v = json_object(body)?;
    if st.opts.log.prompts {
        log.update(|f| f.prompt = v.get("messages").cloned());
    }
    let req: ChatRequest = parse(&v)?;
    let sf: SamplingFields = parse(&v)?;
    let (adapter, model) = check_model(&st, &req.model)?;
    log.update(|f| f.model = Some(model.clone()));
    req.check_messages()?;
    let choice = req.tool_choice()?;
    let tools = match choice {
        ToolChoice::None => Vec::new(),
        _ => req.template_tools()?,
    };
    // Images are decoded and run through the vision tower here: off the async threads.
    let (backend, messages, tools2) = (st.backend.clone(), req.messages.clone(), tools.clone());
    let (ids, media) = tokio::task::spawn_blocking(move || {
        backend.encode_chat(&messages, (!tools2.is_empty()).then_some(&tools2[..]))
    })
    .await
    .map_err(|e| ApiError::internal(format!("encoding the prompt: {e}")))?
    .map_err(|e| ApiError::param("messages", format!("{e:#}")))?;
    let mut params = sf.params()?;
    let asked = req.max_completion_tokens.or(sf.max_tokens);
    params.max_tokens = max_tokens(&st, ids.len(), asked, "messages")?;
    let base = Request {
        prompt: ids,
        params,
        grammar: req.grammar(&choice)?,
        logprobs: req.logprobs()?,
        media,
        adapter,
    };
    let parse_tools = !tools.is_empty();
    let prompt_tokens = base.prompt.len();
    let rxs = submit(&st, &base, sf.n()).await?;
    log.update(|f| f.prompt_tokens = prompt_tokens);
    let id = new_id("chatcmpl-");
    let created = super::unix_now();
    if sf.stream() {
        let mut s = ChatStream {
            st: st.clone(),
            t0,
            id,
            model,
            created,
            parsers: (0..rxs.len())
                .map(|_| parse_tools.then(ToolCallParser::new))
                .collect(),
            calls: vec![0; rxs.len()],
            open: rxs.len(),
            completion_tokens: 0,
            prompt_tokens,
            include_usage: sf.include_usage(),
            first: true,
            log: log.clone(),
        };
        let events = merged(rxs, Cut::new(&st, t0));
        return Ok(sse_response(events.map(move |(i, ev)| s.on(i, ev))));
    }
    let (all, completion_tokens) = collect_all(&st, rxs, t0, &log).await?;
    let mut choices = Vec::new();
    for (i, c) in all.into_iter().enumerate() {
        let (content, calls) = if parse_tools {
            ToolCallParser::parse(&c.text)
        } else {
            (c.text, Vec::new())
        };
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            if content.trim().is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = calls.iter().map(|c| tool_call_json(c, None)).collect();
        }
        let finish = finish_str(c.finish, !calls.is_empty());
        log.update(|f| f.finish.push(finish));
        choices.push(json!({
            "index": i,
            "message": message,
            "logprobs": base.logprobs.map(|_| chat_logprobs(&c.logprobs)),
            "finish_reason": finish,
        }));
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// Turns engine events into `chat.completion.chunk` objects.
struct ChatStream {
    st: AppState,
    t0: Instant,
    id: String,
    model: String,
    created: u64,
    parsers: Vec<Option<ToolCallParser>>,
    /// Tool calls streamed so far per choice (their delta index).
    calls: Vec<usize>,
    open: usize,
    completion_tokens: usize,
    prompt_tokens: usize,
    include_usage: bool,
    first: bool,
    log: RequestLog,
}

impl ChatStream {
    fn chunk(
        &self,
        i: usize,
        delta: Value,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn tool_events(&mut self, i: usize, events: Vec<ToolEvent>, out: &mut Vec<Value>) {
        for ev in events {
            match ev {
                ToolEvent::Content(text) if !text.is_empty() => {
                    out.push(self.chunk(i, json!({"content": text}), None, None))
                }
                ToolEvent::Content(_) => {}
                ToolEvent::Call(call) => {
                    let idx = self.calls[i];
                    self.calls[i] += 1;
                    let delta = json!({"tool_calls": [tool_call_json(&call, Some(idx))]});
                    out.push(self.chunk(i, delta, None, None));
                }
            }
        }
    }

    /// The choice's tool-call parser's last words and its final chunk.
    fn finish(&mut self, i: usize, f: FinishReason, out: &mut Vec<Value>) {
        if let Some(evs) = self.parsers[i].as_mut().map(ToolCallParser::finish) {
            self.tool_events(i, evs, out);
        }
        let reason = finish_str(f, self.calls[i] > 0);
        self.log.update(|l| l.finish.push(reason));
        out.push(self.chunk(i, json!({}), None, Some(reason)));
        self.close(out);
    }

    fn on(&mut self, i: usize, ev: Option<Event>) -> Vec<Value> {
        let mut out = Vec::new();
        let Some(ev) = ev else {
            self.finish(i, FinishReason::Length, &mut out);
            return out;
        };
        match ev {
            Event::Started => {
                out.push(self.chunk(i, json!({"role": "assistant", "content": ""}), None, None))
            }
            Event::Step(s) => {
                if self.first {
                    self.first = false;
                    let t = self.t0.elapsed().as_secs_f64();
                    self.st.metrics.time_to_first_token.observe(t);
                    self.log.update(|l| l.first_token_s = Some(t));
                }
                self.completion_tokens += 1;
                self.log.update(|l| l.completion_tokens += 1);
                self.st.metrics.generation_tokens.inc();
                let lp = s
                    .logprob
                    .as_ref()
                    .map(|l| chat_logprobs(std::slice::from_ref(l)));
                match self.parsers[i].as_mut() {
                    Some(p) => {
                        let evs = p.push(&s.text);
                        self.tool_events(i, evs, &mut out);
                        if let Some(lp) = lp {
                            out.push(self.chunk(i, json!({}), Some(lp), None));
                        }
                    }
                    None if !s.text.is_empty() || lp.is_some() => {
                        out.push(self.chunk(i, json!({"content": s.text}), lp, None))
                    }
                    None => {}
                }
                if let Some(f) = s.finish {
                    self.finish(i, f, &mut out);
                }
            }
            Event::Error(e) => {
                out.push(ApiError::internal(e).body());
                self.close(&mut out);
            }
        }
        out
    }

    fn close(&mut self, out: &mut Vec<Value>) {
        self.open -= 1;
        if self.open == 0 {
            self.st
                .metrics
                .latency
                .observe(self.t0.elapsed().as_secs_f64());
            if self.include_usage {
                out.push(json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [],
                    "usage": usage(self.prompt_tokens, self.completion_tokens),
                }));
            }
        }
    }
}

fn legacy_logprobs(lps: &[TokenLogprob], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::new();
    for lp in lps {
        offsets.push(offset);
        offset += lp.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|t| (t.token.clone(), json!(t.logprob)))
                .collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

pub async fn completions(
    State(st): State<AppState>,
    Extension(log): Extension<RequestLog>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let v = json_object(body)?;
    if st.opts.log.prompts {
        log.update(|f| f.prompt = v.get("prompt").cloned());
    }
    let req: CompletionRequest = parse(&v)?;
    let sf: SamplingFields = parse(&v)?;
    let (adapter, model) = check_model(&st, &req.model)?;
    log.update(|f| f.model = Some(model.clone()));
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "suffix is not supported"));
    }
    if req
        .logprobs
        .is_some_and(|n| n > crate::engine::generation::MAX_TOP_LOGPROBS)
    {
        return Err(ApiError::param("logprobs", "logprobs must be at most 20"));
    }
    let prompts: Vec<Vec<u32>> = match req.prompt {
        Prompt::Text(t) => vec![tokenize(&st, &t)?],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| tokenize(&st, t))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids],
        Prompt::IdLists(l) => l,
    };
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "prompt must not be empty"));
    }
    let mut params = sf.params()?;
    let n = sf.n();
    let echo = req.echo.unwrap_or(false);
    let mut rxs = Vec::new();
    let mut echoes = Vec::new();
    let mut prompt_tokens = 0;
    for ids in prompts {
        // The legacy endpoint's default output budget is 16 tokens.
        params.max_tokens =
            max_tokens(&st, ids.len(), Some(sf.max_tokens.unwrap_or(16)), "prompt")?;
        prompt_tokens += ids.len();
        let echo_text = if echo {
            st.backend
                .detokenize(&ids)
                .map_err(|e| ApiError::param("prompt", format!("{e:#}")))?
        } else {
            String::new()
        };
        let base = Request {
            prompt: ids,
            params: params.clone(),
            grammar: None,
            logprobs: req.logprobs,
            media: None,
            adapter,
        };
        for rx in submit(&st, &base, n).await? {
            rxs.push(rx);
            echoes.push(echo_text.clone());
        }
    }
    log.update(|f| f.prompt_tokens = prompt_tokens);
    let id = new_id("cmpl-");
    let created = super::unix_now();
    let chunk = move |i: usize, text: &str, lp: Option<Value>, finish: Option<&str>| {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})
    };
    if sf.stream() {
        let mut open = rxs.len();
        let mut completion_tokens = 0;
        let include_usage = sf.include_usage();
        let want_lp = req.logprobs.is_some();
        let cut = Cut::new(&st, t0);
        let mut first = true;
        let events = merged(rxs, cut).map(move |(i, ev)| {
            let mut out = Vec::new();
            let mut closed = false;
            match ev {
                Some(Event::Started) if !echoes[i].is_empty() => {
                    out.push(chunk(i, &echoes[i], None, None))
                }
                Some(Event::Started) => {}
                None => {
                    log.update(|l| l.finish.push("length"));
                    out.push(chunk(i, "", None, Some("length")));
                    closed = true;
                }
                Some(Event::Step(s)) => {
                    if first {
                        first = false;
                        let t = t0.elapsed().as_secs_f64();
                        log.update(|l| l.first_token_s = Some(t));
                    }
                    completion_tokens += 1;
                    log.update(|l| l.completion_tokens += 1);
                    let lp = s
                        .logprob
                        .as_ref()
                        .filter(|_| want_lp)
                        .map(|l| legacy_logprobs(std::slice::from_ref(l), 0));
                    if !s.text.is_empty() || lp.is_some() {
                        out.push(chunk(i, &s.text, lp, None));
                    }
                    if let Some(f) = s.finish {
                        let reason = finish_str(f, false);
                        log.update(|l| l.finish.push(reason));
                        out.push(chunk(i, "", None, Some(reason)));
                        closed = true;
                    }
                }
                Some(Event::Error(e)) => {
                    out.push(ApiError::internal(e).body());
                    closed = true;
                }
            }
            if closed {
                open -= 1;
                if open == 0 && include_usage {
                    let mut u = chunk(0, "", None, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, completion_tokens);
                    out.push(u);
                }
            }
            out
        });
        return Ok(sse_response(events));
    }
    let (all, completion_tokens) = collect_all(&st, rxs, t0, &log).await?;
    let mut choices = Vec::new();
    for (i, c) in all.into_iter().enumerate() {
        log.update(|l| l.finish.push(finish_str(c.finish, false)));
        let lp = req
            .logprobs
            .map(|_| legacy_logprobs(&c.logprobs, echoes[i].len()));
        let mut one = chunk(
            i,
            &format!("{}{}", echoes[i], c.text),
            lp,
            Some(finish_str(c.finish, false)),
        );
        choices.push(one["choices"][0].take());
    }
    let mut body = chunk(0, "", None, None);
    body["choices"] = Value::Array(choices);
    body["usage"] = usage(prompt_tokens, completion_tokens);
    Ok(Json(body).into_response())
}

fn tokenize(st: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    st.backend
        .tokenize(text)
        .map_err(|e| ApiError::param("prompt", format!("{e:#}")))
}

pub async fn models(State(st): State<AppState>) -> Response {
    let card = |id: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "phi4",
            "root": parent.unwrap_or(id),
            "parent": parent,
            "max_model_len": st.backend.max_model_len(),
        })
    };
    let mut data = vec![card(&st.opts.model_id, None)];
    data.extend(
        st.opts
            .lora_modules
            .iter()
            .map(|n| card(n, Some(&st.opts.model_id))),
    );
    Json(json!({ "object": "list", "data": data })).into_response()
}
