//! Text side: the tokenizer, the chat template and Python-compatible JSON for prompts.

pub mod chat;
pub mod pyjson;
pub mod tokenizer;
pub mod tool_calls;

pub use chat::{AudioSource, ChatTemplate, ImageSource, MediaSource, Message};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
