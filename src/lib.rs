//! phi4: run, serve and fine-tune Microsoft's Phi-4 small language models on ordinary hardware.
//!
//! Layers, lowest first (a lower layer never imports a higher one):
//! `kernels` → `paging`/`weights`/`config` → `model` → `text` → `engine` → `server` → `cli`
//! (the `phi4` binary).

pub mod bench;
pub mod config;
pub mod engine;
pub mod hub;
pub mod kernels;
pub mod media;
pub mod model;
pub mod paging;
pub mod server;
pub mod text;
pub mod time;
pub mod train;
pub mod weights;

pub use engine::{Engine, FinishReason, Output, RopePolicy, SamplingParams, StreamEvent};
pub use text::Message;

/// The README's Rust example runs as a doctest, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
