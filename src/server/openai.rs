//! The OpenAI request bodies this server accepts, turned into engine requests. Unknown fields
//! are ignored (as OpenAI and vLLM do); a known field of the wrong type or out of range is a
//! 400 naming it.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{Grammar, SamplingParams};
use crate::text::Message;

/// Parses `body` as `T`, naming the field on a type error.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            ApiError::invalid(inner)
        } else {
            ApiError::param(&path, format!("{path}: {inner}"))
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub max_tokens: Option<usize>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;

impl SamplingFields {
    /// Engine parameters, every value checked; `max_tokens` is filled in later.
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams {
            // OpenAI's default; greedy is temperature 0.
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: 0,
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            ..Default::default()
        };
        if !(0.0..=2.0).contains(&p.temperature) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be between 0 and 2, got {}", p.temperature),
            ));
        }
        match self.top_k {
            None | Some(-1) | Some(0) => {}
            Some(k) if k > 0 => p.top_k = k as usize,
            Some(k) => {
                return Err(ApiError::param(
                    "top_k",
                    format!("top_k must be -1 (off) or positive, got {k}"),
                ))
            }
        }
        p.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if let Some(n) = self.n {
            if n == 0 || n > MAX_N {
                return Err(ApiError::param(
                    "n",
                    format!("n must be between 1 and {MAX_N}, got {n}"),
                ));
            }
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        p.max_tokens = 1;
        p.validate().map_err(|e| {
            let msg = e.to_string();
            let param = msg.split_whitespace().next().unwrap_or("").to_string();
            ApiError::param(&param, msg)
        })?;
        Ok(p)
    }

    pub fn n(&self) -> usize {
        self.n.unwrap_or(1)
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ToolDef {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    pub schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub tools: Option<Vec<ToolDef>>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub parallel_tool_calls: Option<bool>,
}

/// Most calls a forced tool-call reply may hold when parallel calls are allowed.
pub const MAX_FORCED_CALLS: usize = 4;

/// How the reply may use tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

impl ChatRequest {
    pub fn check_messages(&self) -> Result<(), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                return Err(ApiError::param(
                    &format!("messages[{i}].role"),
                    format!(
                        "messages[{i}].role: unknown role {:?} (system, user, assistant or tool)",
                        m.role
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn tool_choice(&self) -> Result<ToolChoice, ApiError> {
        let has_tools = self.tools.as_ref().is_some_and(|t| !t.is_empty());
        let choice = match &self.tool_choice {
            None if has_tools => ToolChoice::Auto,
            None => ToolChoice::None,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::param(
                        "tool_choice",
                        format!("tool_choice must be none, auto, required or a named function, not {other:?}"),
                    ))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) => ToolChoice::Named(name.to_string()),
                None => {
                    return Err(ApiError::param(
                        "tool_choice",
                        "tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ))
                }
            },
        };
        if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) && !has_tools {
            return Err(ApiError::param(
                "tool_choice",
                "tool_choice requires a tool but the request declares no tools",
            ));
        }
        if let ToolChoice::Named(name) = &choice {
            if !self.tool_defs().iter().any(|t| &t.function.name == name) {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not among the declared tools"),
                ));
            }
        }
        Ok(choice)
    }

    fn tool_defs(&self) -> &[ToolDef] {
        self.tools.as_deref().unwrap_or_default()
    }

    /// The tools as the chat template takes them (OpenAI objects), checked.
    pub fn template_tools(&self) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        for (i, t) in self.tool_defs().iter().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::param(
                    &format!("tools[{i}].type"),
                    format!("tools[{i}].type must be \"function\", not {:?}", t.kind),
                ));
            }
            if t.function.name.is_empty() {
                return Err(ApiError::param(
                    &format!("tools[{i}].function.name"),
                    "a tool needs a name",
                ));
            }
            let mut f = serde_json::Map::new();
            f.insert("name".into(), t.function.name.clone().into());
            if let Some(d) = &t.function.description {
                f.insert("description".into(), d.clone().into());
            }
            if let Some(p) = &t.function.parameters {
                f.insert("parameters".into(), p.clone());
            }
            out.push(serde_json::json!({"type": "function", "function": f}));
        }
        Ok(out)
    }

    /// The grammar the reply must follow, if any: a forced tool call wins over a response
    /// format.
    pub fn grammar(&self, choice: &ToolChoice) -> Result<Option<Grammar>, ApiError> {
        let tool = |t: &ToolDef| {
            (
                t.function.name.clone(),
                t.function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({"type": "object"})),
            )
        };
        let max_calls = if self.parallel_tool_calls.unwrap_or(true) {
            MAX_FORCED_CALLS
        } else {
            1
        };
        match choice {
            ToolChoice::Required => {
                return Ok(Some(Grammar::ToolCalls {
                    tools: self.tool_defs().iter().map(tool).collect(),
                    max_calls,
                }))
            }
            // Naming a function asks for a call of it: one.
            ToolChoice::Named(name) => {
                return Ok(Some(Grammar::ToolCalls {
                    tools: self
                        .tool_defs()
                        .iter()
                        .filter(|t| &t.function.name == name)
                        .map(tool)
                        .collect(),
                    max_calls: 1,
                }))
            }
            _ => {}
        }
        let Some(rf) = &self.response_format else {
            return Ok(None);
        };
        match rf.kind.as_str() {
            "text" => Ok(None),
            "json_object" => Ok(Some(Grammar::json_object())),
            "json_schema" => match rf.json_schema.as_ref().and_then(|j| j.schema.clone()) {
                Some(schema) => Ok(Some(Grammar::JsonSchema(schema))),
                None => Err(ApiError::param(
                    "response_format.json_schema.schema",
                    "response_format json_schema needs json_schema.schema",
                )),
            },
            other => Err(ApiError::param(
                "response_format.type",
                format!(
                    "response_format.type must be text, json_object or json_schema, not {other:?}"
                ),
            )),
        }
    }

    /// Top alternatives per token when logprobs are on.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(_)) => Err(ApiError::param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            )),
            (false, None) => Ok(None),
            (true, n) => {
                let n = n.unwrap_or(0);
                if n > crate::engine::generation::MAX_TOP_LOGPROBS {
                    return Err(ApiError::param(
                        "top_logprobs",
                        format!("top_logprobs must be at most 20, got {n}"),
                    ));
                }
                Ok(Some(n))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub echo: Option<bool>,
    pub logprobs: Option<usize>,
    pub suffix: Option<String>,
}
