//! Chat prompts: the checkpoint's Jinja `chat_template` rendered with minijinja, configured as
//! transformers configures Jinja (`trim_blocks`, `lstrip_blocks`, Python string methods), so a
//! render is byte-identical to `apply_chat_template(..., tokenize=False)`.
//!
//! Tools: the official Phi-4 template reads a pre-serialised JSON string from the *system
//! message's* `tools` field and ignores the top-level `tools` argument transformers passes
//! (spec P7). When a template reads `message['tools']`, OpenAI-style top-level tools are moved
//! there: the list of their `function` objects, serialised as Python's
//! `json.dumps(..., ensure_ascii=False)`, on the first system message (a system message
//! "You are a helpful assistant with some tools." is inserted when there is none). Templates
//! that read the top-level `tools` variable get it unchanged.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::pyjson;

/// The official Phi-4-mini chat template (tokenizer_config.json), used when a checkpoint has none.
pub const PHI4_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";

/// System prompt inserted when tools are given without a system message.
pub const DEFAULT_TOOLS_SYSTEM: &str = "You are a helpful assistant with some tools.";

/// One chat message. `content` accepts a string, null, or OpenAI content parts: text parts are
/// joined with newlines, each `image_url` part becomes an image of the message, written into the
/// text as its placeholder `<|image_N|>` (N counting the message's images from 1) where the part
/// stands, and each `input_audio` (`{"data": base64, "format": "wav"}`) or `audio_url` part an
/// audio, written as `<|audio_N|>`. Other fields (`tools`, `tool_calls`, `name`, ...) pass to the
/// template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "RawMessage")]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The message's images in placeholder order. The engine (or the server, under its rules
    /// for what may be fetched or read) resolves them.
    #[serde(skip)]
    pub images: Vec<ImageSource>,
    /// The message's audios in placeholder order, resolved as images are.
    #[serde(skip)]
    pub audios: Vec<AudioSource>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Where an image or an audio comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaSource {
    /// A `data:` URL, an `http(s)://` URL, a `file://` URL or a local path.
    Url(String),
    /// The file's bytes.
    Bytes(std::sync::Arc<Vec<u8>>),
}

pub type ImageSource = MediaSource;
pub type AudioSource = MediaSource;

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            images: Vec::new(),
            audios: Vec::new(),
            extra: Map::new(),
        }
    }

    /// A message with images; `content` may place them with `<|image_1|>`, `<|image_2|>`, …
    /// (else they go before the text, see [`Message::place_images`]).
    pub fn with_images(role: &str, content: &str, images: Vec<ImageSource>) -> Message {
        let mut m = Message::new(role, content);
        m.images = images;
        m.place_images();
        m
    }

    /// A message with images and audios, placed as [`Message::with_images`] places images.
    pub fn with_media(
        role: &str,
        content: &str,
        images: Vec<ImageSource>,
        audios: Vec<AudioSource>,
    ) -> Message {
        let mut m = Message::new(role, content);
        m.images = images;
        m.audios = audios;
        m.place_images();
        m
    }

    /// Puts the placeholders of images (then audios) the text does not mention in front of it,
    /// as users of other engines expect when they attach media without saying where.
    pub fn place_images(&mut self) {
        let mut tags = String::new();
        if !self.images.is_empty() && !self.content.contains("<|image_") {
            tags.extend((1..=self.images.len()).map(|i| format!("<|image_{i}|>")));
        }
        if !self.audios.is_empty() && !self.content.contains("<|audio_") {
            tags.extend((1..=self.audios.len()).map(|i| format!("<|audio_{i}|>")));
        }
        self.content.insert_str(0, &tags);
    }
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl TryFrom<RawMessage> for Message {
    type Error = String;

    fn try_from(raw: RawMessage) -> Result<Message, String> {
        let mut m = Message::new(&raw.role, "");
        m.extra = raw.extra;
        match raw.content {
            Value::Null => {}
            Value::String(s) => m.content = s,
            Value::Array(parts) => {
                let mut out = String::new();
                let mut last_text = false;
                for p in parts {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = p
                                .get("text")
                                .and_then(Value::as_str)
                                .ok_or("a text content part needs a \"text\" string")?;
                            if last_text {
                                out.push('\n');
                            }
                            out.push_str(t);
                            last_text = true;
                        }
                        Some("image_url") => {
                            let url = part_url(&p, "image_url")?;
                            m.images.push(ImageSource::Url(url.to_owned()));
                            out.push_str(&format!("<|image_{}|>", m.images.len()));
                            last_text = false;
                        }
                        Some("input_audio") => {
                            let a = p.get("input_audio").ok_or(
                                "an input_audio content part needs \"input_audio\": {\"data\": base64, \"format\": ...}",
                            )?;
                            let data = a
                                .get("data")
                                .and_then(Value::as_str)
                                .ok_or("input_audio needs \"data\", the file's bytes in base64")?;
                            let format = a.get("format").and_then(Value::as_str).unwrap_or("wav");
                            if !format.bytes().all(|b| b.is_ascii_alphanumeric()) {
                                return Err(format!(
                                    "input_audio format {format:?} is not a file type"
                                ));
                            }
                            // As a data: URL, so one set of rules (size limits, decoding) applies.
                            m.audios.push(AudioSource::Url(format!(
                                "data:audio/{format};base64,{data}"
                            )));
                            out.push_str(&format!("<|audio_{}|>", m.audios.len()));
                            last_text = false;
                        }
                        Some("audio_url") => {
                            let url = part_url(&p, "audio_url")?;
                            m.audios.push(AudioSource::Url(url.to_owned()));
                            out.push_str(&format!("<|audio_{}|>", m.audios.len()));
                            last_text = false;
                        }
                        Some(kind) => {
                            return Err(format!("content part of type {kind:?} is not supported"))
                        }
                        None => return Err("content part needs a \"type\"".into()),
                    }
                }
                m.content = out;
            }
            other => {
                return Err(format!(
                    "message content must be a string or a list of parts, not {other}"
                ))
            }
        }
        Ok(m)
    }
}

/// The URL of an `image_url` / `audio_url` part: `{"<kind>": {"url": ...}}` or the string itself.
fn part_url<'a>(part: &'a Value, kind: &str) -> Result<&'a str, String> {
    part.get(kind)
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("an {kind} content part needs \"{kind}\": {{\"url\": ...}}"))
}

pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    eos_token: String,
    bos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .context("the chat template does not parse")?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env,
            eos_token: eos_token.into(),
            bos_token: bos_token.into(),
        })
    }

    /// The template of a model directory: `chat_template` in tokenizer_config.json (a string or
    /// a list of named templates, "default" taken), else `chat_template.jinja`, else the
    /// official Phi-4 template. bos/eos strings come from tokenizer_config.json.
    pub fn from_model_dir(dir: &Path) -> Result<ChatTemplate> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?
        } else {
            Value::Null
        };
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("<|endoftext|>")
                    .to_string(),
                _ => "<|endoftext|>".to_string(),
            }
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned)
                .with_context(|| {
                    format!(
                        "{}: chat_template list has no \"default\" entry",
                        cfg_path.display()
                    )
                })?,
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    std::fs::read_to_string(&jinja)
                        .with_context(|| format!("reading {}", jinja.display()))?
                } else {
                    PHI4_CHAT_TEMPLATE.to_string()
                }
            }
        };
        ChatTemplate::new(&source, &token("bos_token"), &token("eos_token"))
    }

    /// The end-of-text string the template appends to a finished conversation.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// True if the template takes tool declarations from the system message (the official form).
    fn reads_message_tools(&self) -> bool {
        self.source.contains("message['tools']") || self.source.contains("message.tools")
    }

    /// Renders `messages` (and OpenAI-style `tools`, see the module docs) to prompt text.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            bail!("a chat needs at least one message");
        }
        let mut msgs = messages.to_vec();
        let mut top_level_tools = None;
        if let Some(tools) = tools.filter(|t| !t.is_empty()) {
            if self.reads_message_tools() {
                let functions: Vec<Value> = tools
                    .iter()
                    .map(|t| t.get("function").cloned().unwrap_or_else(|| t.clone()))
                    .collect();
                if msgs[0].role != "system" {
                    msgs.insert(0, Message::new("system", DEFAULT_TOOLS_SYSTEM));
                }
                msgs[0]
                    .extra
                    .insert("tools".into(), Value::String(pyjson::dumps(&functions)));
            } else {
                top_level_tools = Some(tools.to_vec());
            }
        }
        if self.reads_message_tools() {
            for m in msgs.iter_mut() {
                render_tool_turn(m);
            }
        }
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let out = tmpl
            .render(context! {
                messages => minijinja::Value::from(minijinja::value::Serde(&msgs)),
                tools => minijinja::Value::from(minijinja::value::Serde(&top_level_tools)),
                add_generation_prompt => add_generation_prompt,
                eos_token => &self.eos_token,
                bos_token => &self.bos_token,
            })
            .context("rendering the chat template failed")?;
        Ok(out)
    }
}

/// Earlier tool use, in the one format this engine documents for the official template (which
/// has no tool-role handling of its own; a `tool` message would render as `<|tool|>`, the
/// declaration marker):
/// - an assistant message's OpenAI `tool_calls` are appended to its content as
///   `<|tool_call|>` + `[{"name": ..., "arguments": {...}}, ...]` (Python `json.dumps` form) +
///   `<|/tool_call|>`, the shape the model emits;
/// - a `tool` message becomes `<|tool_response|>{content}<|end|>` (its role renamed, so the
///   template's `<|role|>` prefix writes the `<|tool_response|>` token), as llama.cpp renders it.
fn render_tool_turn(m: &mut Message) {
    if m.role == "tool" {
        m.role = "tool_response".into();
        m.extra.remove("tool_call_id");
        m.extra.remove("name");
        return;
    }
    if m.role != "assistant" {
        return;
    }
    let Some(Value::Array(calls)) = m.extra.remove("tool_calls") else {
        return;
    };
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            let f = c.get("function").unwrap_or(c);
            let args = match f.get("arguments") {
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                }
                Some(v) => v.clone(),
                None => Value::Object(Map::new()),
            };
            serde_json::json!({"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": args})
        })
        .collect();
    if !calls.is_empty() {
        m.content.push_str("<|tool_call|>");
        m.content.push_str(&pyjson::dumps(&calls));
        m.content.push_str("<|/tool_call|>");
    }
}
