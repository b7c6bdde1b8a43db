//! HTTP behaviour of `phi4 serve` against a scripted backend: request validation and error
//! shapes, auth, limits, tool-call parsing (whole and streamed), and how requests reach the
//! engine. No model is involved; tests/openai_sdk.rs runs the real server.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use phi4::engine::{Event, FinishReason, Grammar, Request, Step, SubmitError};
use phi4::server::{router, Backend, ServerOptions};
use phi4::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower::ServiceExt;

/// Replies with fixed text pieces; one token per byte of the prompt.
struct Scripted {
    pieces: Vec<String>,
    queue_full: bool,
    submitted: Mutex<Vec<Request>>,
}

impl Scripted {
    fn new(pieces: &[&str]) -> Arc<Scripted> {
        Arc::new(Scripted {
            pieces: pieces.iter().map(|s| s.to_string()).collect(),
            queue_full: false,
            submitted: Mutex::new(Vec::new()),
        })
    }
}

impl Backend for Scripted {
    fn max_model_len(&self) -> usize {
        400
    }

    fn render_chat(&self, messages: &[Message], tools: Option<&[Value]>) -> anyhow::Result<String> {
        let mut s = String::new();
        if let Some(t) = tools {
            s.push_str(&format!("tools: {}\n", Value::from(t.to_vec())));
        }
        for m in messages {
            s.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        Ok(s)
    }

    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn detokenize(&self, ids: &[u32]) -> anyhow::Result<String> {
        Ok(ids.iter().map(|&i| i as u8 as char).collect())
    }

    fn check(&self, req: &Request) -> anyhow::Result<()> {
        if let Some(&bad) = req.prompt.iter().find(|&&t| t > 255) {
            anyhow::bail!("prompt token id {bad} is outside the model's vocabulary");
        }
        Ok(())
    }

    fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if self.queue_full {
            return Err(SubmitError::QueueFull);
        }
        let (tx, rx) = unbounded_channel();
        tx.send(Event::Started).unwrap();
        let n = self.pieces.len().min(req.params.max_tokens);
        for (i, p) in self.pieces.iter().take(n).enumerate() {
            let last = i + 1 == n;
            let finish = match (last, n < self.pieces.len()) {
                (false, _) => None,
                (true, true) => Some(FinishReason::Length),
                (true, false) => Some(FinishReason::Stop),
            };
            tx.send(Event::Step(Step {
                token: i as u32,
                text: p.clone(),
                logprob: None,
                finish,
            }))
            .unwrap();
        }
        self.submitted.lock().unwrap().push(req);
        Ok(rx)
    }

    fn load(&self) -> (usize, usize) {
        (3, 2)
    }
}

fn app(b: Arc<Scripted>) -> Router {
    router(b, ServerOptions::default())
}

async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    call_with(app, method, path, body, None).await
}

async fn call_with(
    app: &Router,
    method: &str,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> (StatusCode, String) {
    let mut req = HttpRequest::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, text) = call(app, "POST", path, &body.to_string()).await;
    (s, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The JSON objects of an SSE body, checking it ends with [DONE].
fn sse_chunks(body: &str) -> Vec<Value> {
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        datas.last(),
        Some(&"[DONE]"),
        "stream must end with [DONE]: {body}"
    );
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, param: Option<&str>) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn chat_completion_returns_the_text_and_usage() {
    let b = Scripted::new(&["Hel", "lo", "!"]);
    let (s, v) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"model": "phi4", "messages": user("hi"), "temperature": 0, "seed": 3,
               "stop": "END", "max_tokens": 10}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello!");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let prompt_len = "user: hi\n".len();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt_len, "completion_tokens": 3, "total_tokens": prompt_len + 3})
    );
    let sub = b.submitted.lock().unwrap();
    assert_eq!(sub[0].params.temperature, 0.0);
    assert_eq!(sub[0].params.seed, Some(3));
    assert_eq!(sub[0].params.stop, vec!["END".to_string()]);
    assert_eq!(sub[0].params.max_tokens, 10);
    assert!(sub[0].grammar.is_none());
}

#[tokio::test]
async fn max_tokens_cut_is_finish_reason_length_and_defaults_fill_the_context() {
    let b = Scripted::new(&["a", "b", "c"]);
    let (_, v) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_completion_tokens": 2}),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "ab");
    let (_, _) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"messages": user("hi")}),
    )
    .await;
    let sub = b.submitted.lock().unwrap();
    assert_eq!(sub[1].params.max_tokens, 400 - "user: hi\n".len());
    assert_eq!(
        sub[1].params.temperature, 1.0,
        "OpenAI's default temperature"
    );
}

const TOOLS: &str = r#"[{"type": "function", "function": {"name": "get_weather",
    "description": "Weather now", "parameters": {"type": "object",
    "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]"#;

#[tokio::test]
async fn tool_call_output_becomes_tool_calls() {
    let b = Scripted::new(&[
        "<|tool",
        "_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": [1, [2, 3]]}}",
        "]<|/tool_call|>",
    ]);
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let (s, v) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"messages": user("weather?"), "tools": tools}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], Value::Null);
    let call = &c["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Zürich", "days": [1, [2, 3]]}));
    let sub = b.submitted.lock().unwrap();
    let prompt: String = sub[0].prompt.iter().map(|&i| i as u8 as char).collect();
    assert!(prompt.contains("get_weather"), "tools reach the template");
    assert!(sub[0].grammar.is_none(), "auto does not constrain");
}

#[tokio::test]
async fn streamed_tool_calls_arrive_as_tool_call_deltas() {
    let b = Scripted::new(&[
        "Let me check. ",
        "<|tool_",
        "call|>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}<|/tool_call|>",
        "<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}]",
        "<|/tool_call|>",
    ]);
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let body = json!({"messages": user("weather?"), "tools": tools, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (s, text) = call(&app(b), "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(s, StatusCode::OK);
    let chunks = sse_chunks(&text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        let Some(ch) = c["choices"].get(0) else {
            continue;
        };
        if let Some(t) = ch["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(tc) = ch["delta"]["tool_calls"].as_array() {
            calls.extend(tc.iter().cloned());
        }
        if !ch["finish_reason"].is_null() {
            finish = Some(ch["finish_reason"].clone());
        }
    }
    assert_eq!(content, "Let me check. ");
    assert_eq!(finish, Some(json!("tool_calls")));
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (i, (call, city)) in calls.iter().zip(["Oslo", "Rome"]).enumerate() {
        assert_eq!(call["index"], i);
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": city}));
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn malformed_tool_call_is_returned_as_content() {
    let b = Scripted::new(&["<|tool_call|>{\"name\": oops}<|/tool_call|>"]);
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let (s, v) = post(
        &app(b),
        "/v1/chat/completions",
        json!({"messages": user("x"), "tools": tools}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("oops"));
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn tool_choice_none_leaves_tools_out_and_text_alone() {
    let b = Scripted::new(&[
        "<|tool_call|>{\"name\": \"get_weather\", \"arguments\": {}}<|/tool_call|>",
    ]);
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let (_, v) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"messages": user("x"), "tools": tools, "tool_choice": "none"}),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("<|tool_call|>"));
    let sub = b.submitted.lock().unwrap();
    let prompt: String = sub[0].prompt.iter().map(|&i| i as u8 as char).collect();
    assert!(!prompt.contains("get_weather"));
}

#[tokio::test]
async fn forced_tools_and_response_formats_become_grammars() {
    let b = Scripted::new(&["{}"]);
    let a = app(b.clone());
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let params = tools[0]["function"]["parameters"].clone();
    post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user("x"), "tools": tools, "tool_choice": "required"}),
    )
    .await;
    post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user("x"), "tools": tools, "tool_choice": "required",
        "parallel_tool_calls": false}),
    )
    .await;
    post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user("x"), "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    )
    .await;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    post(&a, "/v1/chat/completions", json!({"messages": user("x"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})).await;
    post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user("x"),
        "response_format": {"type": "json_object"}}),
    )
    .await;
    post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user("x"),
        "response_format": {"type": "text"}}),
    )
    .await;
    let sub = b.submitted.lock().unwrap();
    let forced = |max_calls| {
        Some(Grammar::ToolCalls {
            tools: vec![("get_weather".into(), params.clone())],
            max_calls,
        })
    };
    assert_eq!(sub[0].grammar, forced(4));
    assert_eq!(sub[1].grammar, forced(1));
    assert_eq!(sub[2].grammar, forced(1), "a named function is called once");
    assert_eq!(sub[3].grammar, Some(Grammar::JsonSchema(schema)));
    assert_eq!(sub[4].grammar, Some(Grammar::json_object()));
    assert_eq!(sub[5].grammar, None);
}

#[tokio::test]
async fn n_choices_get_consecutive_seeds() {
    let b = Scripted::new(&["x"]);
    let (_, v) = post(
        &app(b.clone()),
        "/v1/chat/completions",
        json!({"messages": user("x"), "n": 3, "seed": 7}),
    )
    .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_eq!(v["choices"][i]["index"], i);
    }
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let seeds: Vec<_> = b
        .submitted
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.params.seed)
        .collect();
    assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
}

#[tokio::test]
async fn completions_endpoint_streams_and_echoes() {
    let b = Scripted::new(&[" wor", "ld"]);
    let a = app(b.clone());
    let (s, v) = post(
        &a,
        "/v1/completions",
        json!({"prompt": "hello", "echo": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "hello world");
    assert_eq!(b.submitted.lock().unwrap()[0].params.max_tokens, 16);
    let body = json!({"prompt": [[104, 105], [104]], "stream": true});
    let (s, text) = call(&a, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(s, StatusCode::OK);
    let chunks = sse_chunks(&text);
    let mut texts = [String::new(), String::new()];
    for c in &chunks {
        let ch = &c["choices"][0];
        texts[ch["index"].as_u64().unwrap() as usize].push_str(ch["text"].as_str().unwrap());
    }
    assert_eq!(texts, [" world".to_string(), " world".to_string()]);
    let (s, v) = post(&a, "/v1/completions", json!({"prompt": [300]})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("300"));
}

#[tokio::test]
async fn client_mistakes_get_openai_errors_with_the_right_status() {
    let a = app(Scripted::new(&["x"]));
    let (s, text) = call(&a, "POST", "/v1/chat/completions", "{not json").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_error(s, &v, StatusCode::BAD_REQUEST, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
    let cases: Vec<(Value, StatusCode, Option<&str>)> = vec![
        (json!([1, 2]), StatusCode::BAD_REQUEST, None),
        (json!({}), StatusCode::BAD_REQUEST, None),
        (
            json!({"messages": "hi"}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            json!({"messages": []}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            json!({"messages": user("x"), "temperature": "hot"}),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
        ),
        (
            json!({"messages": user("x"), "temperature": 3}),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
        ),
        (
            json!({"messages": user("x"), "top_p": 0}),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
        ),
        (
            json!({"messages": user("x"), "max_tokens": -1}),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
        ),
        (
            json!({"messages": user("x"), "max_tokens": 0}),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
        ),
        (
            json!({"messages": user("x"), "n": 0}),
            StatusCode::BAD_REQUEST,
            Some("n"),
        ),
        (
            json!({"messages": user("x"), "presence_penalty": 5}),
            StatusCode::BAD_REQUEST,
            Some("presence_penalty"),
        ),
        (
            json!({"messages": user("x"), "stop": [""]}),
            StatusCode::BAD_REQUEST,
            Some("stop"),
        ),
        (
            json!({"messages": user("x"), "top_logprobs": 3}),
            StatusCode::BAD_REQUEST,
            Some("top_logprobs"),
        ),
        (
            json!({"messages": user("x"), "logprobs": true, "top_logprobs": 50}),
            StatusCode::BAD_REQUEST,
            Some("top_logprobs"),
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"messages": user("x"), "tool_choice": "required"}),
            StatusCode::BAD_REQUEST,
            Some("tool_choice"),
        ),
        (
            json!({"messages": user("x"), "tools": serde_json::from_str::<Value>(TOOLS).unwrap(),
                "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            StatusCode::BAD_REQUEST,
            Some("tool_choice"),
        ),
        (
            json!({"messages": user("x"), "tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
            StatusCode::BAD_REQUEST,
            Some("tools[0].type"),
        ),
        (
            json!({"messages": user("x"), "response_format": {"type": "yaml"}}),
            StatusCode::BAD_REQUEST,
            Some("response_format.type"),
        ),
        (
            json!({"messages": user("x"), "response_format": {"type": "json_schema"}}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"model": "gpt-9", "messages": user("x")}),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            json!({"messages": user(&"x".repeat(500))}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            json!({"messages": user("x"), "max_tokens": 399}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
    ];
    for (body, want, param) in cases {
        let (s, v) = post(&a, "/v1/chat/completions", body.clone()).await;
        assert_error(s, &v, want, param);
        let _ = body;
    }
    let (s, v) = post(
        &a,
        "/v1/chat/completions",
        json!({"messages": user(&"x".repeat(500))}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("messages"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post(&a, "/v1/completions", json!({"prompt": "x", "suffix": "y"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("suffix"));
    let (s, v) = post(&a, "/v1/completions", json!({"prompt": {"a": 1}})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, Some("prompt"));
    let (s, text) = call(&a, "GET", "/v1/nothing", "").await;
    assert_error(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::NOT_FOUND,
        None,
    );
    let (s, text) = call(&a, "GET", "/v1/chat/completions", "").await;
    assert_error(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        None,
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let a = router(
        Scripted::new(&["x"]),
        ServerOptions {
            max_body_bytes: 1000,
            ..Default::default()
        },
    );
    let body = json!({"messages": user(&"y".repeat(2000))}).to_string();
    let (s, text) = call(&a, "POST", "/v1/chat/completions", &body).await;
    assert_error(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    );
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let b = Arc::new(Scripted {
        pieces: vec!["x".into()],
        queue_full: true,
        submitted: Mutex::new(Vec::new()),
    });
    let a = app(b);
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .body(Body::from(json!({"messages": user("x")}).to_string()))
        .unwrap();
    let resp = a.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn api_keys_guard_v1_but_not_health() {
    let a = router(
        Scripted::new(&["x"]),
        ServerOptions {
            api_keys: vec!["sk-one".into(), "sk-two".into()],
            ..Default::default()
        },
    );
    let body = json!({"messages": user("x")}).to_string();
    for key in [None, Some("sk-wrong"), Some("sk-one-longer"), Some("")] {
        let (s, text) = call_with(&a, "POST", "/v1/chat/completions", &body, key).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_error(s, &v, StatusCode::UNAUTHORIZED, None);
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    for key in ["sk-one", "sk-two"] {
        let (s, _) = call_with(&a, "POST", "/v1/chat/completions", &body, Some(key)).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _) = call_with(&a, "GET", "/v1/models", "", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, text) = call(&a, "GET", "/health", "").await;
    assert_eq!((s, text.contains("ok")), (StatusCode::OK, true));
}

#[tokio::test]
async fn models_and_metrics() {
    let a = app(Scripted::new(&["a", "b"]));
    let (s, text) = call(&a, "GET", "/v1/models", "").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"][0]["id"], "phi4");
    assert_eq!(v["data"][0]["object"], "model");
    post(&a, "/v1/chat/completions", json!({"messages": user("hi")})).await;
    post(&a, "/v1/chat/completions", json!({"messages": "bad"})).await;
    let (s, m) = call(&a, "GET", "/metrics", "").await;
    assert_eq!(s, StatusCode::OK);
    for want in [
        "phi4_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "phi4_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1",
        "phi4_prompt_tokens_total 9",
        "phi4_generation_tokens_total 2",
        "phi4_queue_depth 3",
        "phi4_running_sequences 2",
        "phi4_time_to_first_token_seconds_count 1",
        "phi4_request_latency_seconds_count 1",
    ] {
        assert!(m.contains(want), "metrics lack {want:?}:\n{m}");
    }
}
