//! phi4: run, serve and fine-tune Microsoft's Phi-4 small language models on ordinary hardware.
//!
//! Layers, lowest first (a lower layer never imports a higher one):
//! `kernels` → `weights`/`config` → `model` → `text` → `engine` → `cli` (the `phi4` binary).

pub mod config;
pub mod kernels;
pub mod model;
pub mod weights;
