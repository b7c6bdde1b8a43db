//! Tool calls in Phi-4 output: `<|tool_call|>PAYLOAD<|/tool_call|>`, where PAYLOAD is one JSON
//! object `{"name": ..., "arguments": {...}}` or a list of them (both are seen from the model,
//! spec §2.5), and the `functools[...]` form vLLM's Phi-4 template teaches. A payload that is not
//! valid JSON, or names no function, stays in the content: nothing the model wrote is lost.
//!
//! [`ToolCallParser`] works on streamed text pieces: it holds back a tail that may still become
//! a marker (markers split across pieces are common) and releases content as soon as it cannot.

use serde::Serialize;
use serde_json::Value;

pub const CALL_OPEN: &str = "<|tool_call|>";
pub const CALL_CLOSE: &str = "<|/tool_call|>";
const FUNCTOOLS: &str = "functools";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object (`{}` when the model gave none).
    pub arguments: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    Content(String),
    Call(ToolCall),
}

/// Calls in a payload, or None if it is not a valid call payload.
fn calls_from_payload(payload: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(payload.trim()).ok()?;
    let items = match v {
        Value::Array(a) => a,
        obj @ Value::Object(_) => vec![obj],
        _ => return None,
    };
    if items.is_empty() {
        return None;
    }
    items
        .into_iter()
        .map(|it| {
            let name = it.get("name")?.as_str()?.to_string();
            let args = it.get("arguments").or_else(|| it.get("parameters"));
            let arguments = match args {
                None | Some(Value::Null) => Value::Object(Default::default()),
                // Some models put the arguments in as a JSON string.
                Some(Value::String(s)) => serde_json::from_str(s).ok()?,
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => return None,
            };
            Some(ToolCall { name, arguments })
        })
        .collect()
}

/// Length of the first JSON value at the start of `s` (after whitespace), if complete.
fn json_value_len(s: &str) -> Option<usize> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match it.next() {
        Some(Ok(_)) => Some(it.byte_offset()),
        _ => None,
    }
}

/// Longest tail of `text` that is a proper prefix of one of `markers`.
fn partial_marker_tail(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for k in (1..m.len()).rev() {
            if k > best && text.ends_with(&m[..k]) {
                best = k;
                break;
            }
        }
    }
    best
}

#[derive(Debug, Default)]
pub struct ToolCallParser {
    buf: String,
}

impl ToolCallParser {
    pub fn new() -> ToolCallParser {
        ToolCallParser::default()
    }

    /// Feeds a piece of generated text; returns what became final.
    pub fn push(&mut self, piece: &str) -> Vec<ToolEvent> {
        self.buf.push_str(piece);
        let mut out = Vec::new();
        loop {
            let open = self.buf.find(CALL_OPEN);
            let func = self.buf.find(FUNCTOOLS).filter(|&i| {
                // Only `functools` directly followed by `[` (or possibly so, at the end).
                let rest = &self.buf[i + FUNCTOOLS.len()..];
                rest.trim_start().starts_with('[') || rest.trim().is_empty()
            });
            let start = match (open, func) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(i) => i,
                    None => {
                        let keep = partial_marker_tail(&self.buf, &[CALL_OPEN, "functools["]);
                        let cut = self.buf.len() - keep;
                        push_content(&mut out, self.buf[..cut].to_string());
                        self.buf.drain(..cut);
                        return out;
                    }
                },
            };
            push_content(&mut out, self.buf[..start].to_string());
            self.buf.drain(..start);
            if self.buf.starts_with(CALL_OPEN) {
                let Some(end) = self.buf.find(CALL_CLOSE) else {
                    return out;
                };
                let payload = self.buf[CALL_OPEN.len()..end].to_string();
                let whole = self.buf[..end + CALL_CLOSE.len()].to_string();
                self.buf.drain(..end + CALL_CLOSE.len());
                match calls_from_payload(&payload) {
                    Some(calls) => out.extend(calls.into_iter().map(ToolEvent::Call)),
                    None => push_content(&mut out, whole),
                }
            } else {
                // functools[...]: the list ends where its JSON value ends.
                let rest = &self.buf[FUNCTOOLS.len()..];
                // Incomplete (or never-valid) JSON waits; finish() returns it as content.
                let Some(len) = json_value_len(rest) else {
                    return out;
                };
                let payload = rest[..len].to_string();
                let whole = self.buf[..FUNCTOOLS.len() + len].to_string();
                self.buf.drain(..FUNCTOOLS.len() + len);
                match calls_from_payload(&payload) {
                    Some(calls) => out.extend(calls.into_iter().map(ToolEvent::Call)),
                    None => push_content(&mut out, whole),
                }
            }
        }
    }

    /// Ends the stream: an unclosed call whose payload parses is still a call (the model often
    /// stops at `<|end|>` without the closing marker); anything else is content.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let rest = std::mem::take(&mut self.buf);
        let payload = rest
            .strip_prefix(CALL_OPEN)
            .or_else(|| rest.strip_prefix(FUNCTOOLS));
        if let Some(calls) = payload.and_then(calls_from_payload) {
            return calls.into_iter().map(ToolEvent::Call).collect();
        }
        let mut out = Vec::new();
        push_content(&mut out, rest);
        out
    }

    /// Parses a whole output at once.
    pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
        let mut p = ToolCallParser::new();
        let mut events = p.push(text);
        events.extend(p.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for e in events {
            match e {
                ToolEvent::Content(c) => content.push_str(&c),
                ToolEvent::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    }
}

fn push_content(out: &mut Vec<ToolEvent>, s: String) {
    if s.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(prev)) = out.last_mut() {
        prev.push_str(&s);
    } else {
        out.push(ToolEvent::Content(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args,
        }
    }

    #[test]
    fn object_list_nested_and_unicode_payloads() {
        let (c, calls) = ToolCallParser::parse(
            r#"<|tool_call|>{"name": "f", "arguments": {"a": [1, [2, [3]]], "b": {"c": "Zürich ✓"}}}<|/tool_call|>"#,
        );
        assert_eq!(c, "");
        assert_eq!(
            calls,
            vec![call(
                "f",
                json!({"a": [1, [2, [3]]], "b": {"c": "Zürich ✓"}})
            )]
        );
        let (c, calls) = ToolCallParser::parse(
            r#"Let me check.<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\"x\": 1}"}]<|/tool_call|>"#,
        );
        assert_eq!(c, "Let me check.");
        assert_eq!(
            calls,
            vec![call("a", json!({})), call("b", json!({"x": 1}))]
        );
    }

    #[test]
    fn functools_form_with_nested_arrays() {
        let (c, calls) = ToolCallParser::parse(
            r#"functools[{"name": "g", "arguments": {"m": [[1, 2], [3, [4]]]}}] trailing"#,
        );
        assert_eq!(calls, vec![call("g", json!({"m": [[1, 2], [3, [4]]]}))]);
        assert_eq!(c, " trailing");
        // The word alone is just text.
        assert_eq!(
            ToolCallParser::parse("functools are nice").0,
            "functools are nice"
        );
    }

    #[test]
    fn empty_and_malformed_payloads_stay_content() {
        for t in [
            "<|tool_call|><|/tool_call|>",
            "<|tool_call|>[]<|/tool_call|>",
            r#"<|tool_call|>{"name": "f", "arguments": {"a": }<|/tool_call|>"#,
            r#"<|tool_call|>{"arguments": {}}<|/tool_call|>"#,
            "<|tool_call|>{never closed",
        ] {
            let (c, calls) = ToolCallParser::parse(t);
            assert!(calls.is_empty(), "{t}");
            assert_eq!(c, t);
        }
    }

    #[test]
    fn unclosed_call_at_end_of_output_still_parses() {
        let (c, calls) = ToolCallParser::parse(r#"<|tool_call|>{"name": "now"}"#);
        assert_eq!(c, "");
        assert_eq!(calls, vec![call("now", json!({}))]);
    }

    #[test]
    fn markers_split_across_stream_pieces() {
        let text =
            r#"Hi <|tool_call|>{"name": "f", "arguments": {"q": "<|x|>"}}<|/tool_call|> bye"#;
        // Every split into single characters and into pairs gives the same result.
        for step in [1, 2, 3, 7] {
            let mut p = ToolCallParser::new();
            let mut events = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                let piece: String = chunk.iter().collect();
                events.extend(p.push(&piece));
            }
            events.extend(p.finish());
            let content: String = events
                .iter()
                .filter_map(|e| match e {
                    ToolEvent::Content(c) => Some(c.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(content, "Hi  bye", "step {step}");
            let calls: Vec<&ToolCall> = events
                .iter()
                .filter_map(|e| match e {
                    ToolEvent::Call(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(
                calls,
                vec![&call("f", json!({"q": "<|x|>"}))],
                "step {step}"
            );
        }
        // Content is released as soon as it cannot start a marker.
        let mut p = ToolCallParser::new();
        assert_eq!(
            p.push("Hello <|to"),
            vec![ToolEvent::Content("Hello ".into())]
        );
        assert_eq!(
            p.push("day|>"),
            vec![ToolEvent::Content("<|today|>".into())]
        );
    }
}
