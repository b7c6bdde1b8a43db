//! LoRA supervised fine-tuning on the CPU, exact to PyTorch + PEFT (transformers' Trainer as
//! ms-swift drives it): data encoding with ms-swift's loss mask ([`data`]), the trainable
//! adapter and its PEFT files ([`lora`]), the decoder's backward pass ([`backward`]), AdamW and
//! the schedules ([`optim`]), and the loop ([`trainer`]).

pub mod backward;
pub mod data;
pub mod lora;
pub mod optim;
pub mod output;
pub mod plot;
pub mod trainer;

pub use data::{DataOptions, Encoder, Sample, Truncation};
pub use lora::{LoraParams, LoraSettings, TargetModules};
pub use optim::Schedule;
pub use trainer::{Plan, StepLog, TrainConfig, Trainer};
