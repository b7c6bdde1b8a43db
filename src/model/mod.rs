//! Model definitions: one file per block, paths mirroring the Hugging Face tensor names.

pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod phi3;
pub mod phi4mm;
pub mod quantize;
pub mod rope;
pub mod synthetic;

pub use kv_cache::{KvCache, KvType};
pub use linear::AdapterId;
pub use linear::Linear;
pub use phi3::{BatchItem, InputEmbeds, Logits, Phi3ForCausalLM};
pub use quantize::Recipe;
pub use rope::{Rope, RopeTable};
