//! One log line per API request (`--log-format text|json`), written when the response's last
//! byte has gone out, so a stream's line has its final token count: id, status, model, tokens
//! in and out, time to first token, duration, finish reasons, the error's message. The prompt
//! only with `--log-prompts`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// No request lines (what an embedding application gets by default).
    #[default]
    Off,
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LogOptions {
    pub format: LogFormat,
    /// Include the request's messages or prompt.
    pub prompts: bool,
}

/// What the handlers learn about a request.
#[derive(Debug, Default)]
pub struct Fields {
    pub model: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub first_token_s: Option<f64>,
    pub finish: Vec<&'static str>,
    pub prompt: Option<Value>,
}

/// A request's fields, filled in by its handler (also while it streams).
#[derive(Debug, Clone, Default)]
pub struct RequestLog(Arc<Mutex<Fields>>);

impl RequestLog {
    pub fn update(&self, f: impl FnOnce(&mut Fields)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// The message of an error response, left in its extensions for the log line.
#[derive(Debug, Clone)]
pub struct LoggedError(pub String);

/// Written when dropped, which is when the response body is done.
pub struct Line {
    pub format: LogFormat,
    pub id: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub error: Option<String>,
    pub start: Instant,
    pub fields: RequestLog,
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(line) = self.render() {
            eprintln!("{line}");
        }
    }
}

impl Line {
    /// The line (None when logging is off); takes the fields.
    fn render(&mut self) -> Option<String> {
        let f = std::mem::take(&mut *self.fields.0.lock().unwrap_or_else(|e| e.into_inner()));
        let round = |s: f64| (s * 1e4).round() / 1e4;
        let mut m = Map::new();
        m.insert("ts".into(), json!(rfc3339_now()));
        m.insert("id".into(), json!(self.id));
        m.insert("method".into(), json!(self.method));
        m.insert("path".into(), json!(self.path));
        m.insert("status".into(), json!(self.status));
        if let Some(model) = f.model {
            m.insert("model".into(), json!(model));
        }
        m.insert("prompt_tokens".into(), json!(f.prompt_tokens));
        m.insert("completion_tokens".into(), json!(f.completion_tokens));
        if let Some(t) = f.first_token_s {
            m.insert("ttft_s".into(), json!(round(t)));
        }
        m.insert(
            "duration_s".into(),
            json!(round(self.start.elapsed().as_secs_f64())),
        );
        if !f.finish.is_empty() {
            m.insert("finish".into(), json!(f.finish.join(",")));
        }
        if let Some(e) = self.error.take() {
            m.insert("error".into(), json!(e));
        }
        if let Some(p) = f.prompt {
            m.insert("prompt".into(), p);
        }
        let line = match self.format {
            LogFormat::Off => return None,
            LogFormat::Json => {
                let mut o = Map::new();
                o.insert("event".into(), json!("request"));
                o.extend(m);
                Value::Object(o).to_string()
            }
            LogFormat::Text => {
                let ts = m.shift_remove("ts").unwrap_or_default();
                let mut s = format!("{} request", ts.as_str().unwrap_or_default());
                for (k, v) in m {
                    match v {
                        // Plain words stay bare; anything with spaces or quotes is quoted.
                        Value::String(t)
                            if !t.is_empty()
                                && t.chars().all(|c| c.is_ascii_graphic() && c != '"') =>
                        {
                            s.push_str(&format!(" {k}={t}"))
                        }
                        v @ Value::String(_) => s.push_str(&format!(" {k}={v}")),
                        v => s.push_str(&format!(" {k}={v}")),
                    }
                }
                s
            }
        };
        Some(line)
    }
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_now() -> String {
    let t = crate::time::Utc::now();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: LogFormat, prompt: Option<Value>) -> Line {
        let fields = RequestLog::default();
        fields.update(|f| {
            f.model = Some("phi4-mini".into());
            f.prompt_tokens = 12;
            f.completion_tokens = 3;
            f.first_token_s = Some(0.123456);
            f.finish = vec!["stop", "length"];
            f.prompt = prompt;
        });
        Line {
            format,
            id: "req-1".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            error: Some("bad \"thing\" here".into()),
            start: Instant::now(),
            fields,
        }
    }

    #[test]
    fn text_lines_are_key_value_in_a_fixed_order_with_quoted_text() {
        let s = line(LogFormat::Text, None).render().unwrap();
        let (ts, rest) = s.split_once(' ').unwrap();
        assert!(ts.len() == 20 && ts.ends_with('Z'), "{ts}");
        let rest = rest.split(" duration_s=").collect::<Vec<_>>();
        assert_eq!(
            rest[0],
            "request id=req-1 method=POST path=/v1/chat/completions status=200 model=phi4-mini \
             prompt_tokens=12 completion_tokens=3 ttft_s=0.1235"
        );
        assert!(
            rest[1].ends_with(r#" finish=stop,length error="bad \"thing\" here""#),
            "{s}"
        );
        assert!(!s.contains("prompt="));
    }

    #[test]
    fn json_lines_parse_and_carry_the_prompt_only_when_given() {
        let v: Value =
            serde_json::from_str(&line(LogFormat::Json, None).render().unwrap()).unwrap();
        assert_eq!(v["event"], "request");
        assert_eq!(v["completion_tokens"], 3);
        assert_eq!(v["finish"], "stop,length");
        assert!(v.get("prompt").is_none());
        let p = json!([{"role": "user", "content": "hi"}]);
        let with = line(LogFormat::Json, Some(p.clone())).render().unwrap();
        let v: Value = serde_json::from_str(&with).unwrap();
        assert_eq!(v["prompt"], p);
        assert!(line(LogFormat::Off, None).render().is_none());
    }
}
