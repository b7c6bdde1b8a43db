//! The LoRA fine-tuning fixture (tests/fixtures/lora, scripts/make_lora_fixtures.py).

use std::collections::HashMap;
use std::path::PathBuf;

use phi4::config::Phi3Config;
use phi4::model::Phi3ForCausalLM;
use phi4::train::{LoraParams, Sample, Schedule, TrainConfig};
use phi4::weights::{open_safetensors, Checkpoint};
use serde_json::Value;

use super::{fixtures, tiny_dir};

pub fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

pub fn tiny_model() -> Phi3ForCausalLM {
    let dir = tiny_dir();
    let cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    Phi3ForCausalLM::load(cfg, &Checkpoint::open_dir(&dir).unwrap()).unwrap()
}

pub fn reference_samples() -> Vec<Sample> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("samples.json")).unwrap())
            .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            input_ids: serde_json::from_value(s["input_ids"].clone()).unwrap(),
            labels: serde_json::from_value(s["labels"].clone()).unwrap(),
            origin: String::new(),
        })
        .collect()
}

pub fn trajectory() -> Value {
    serde_json::from_str(&std::fs::read_to_string(lora_dir().join("trajectory.json")).unwrap())
        .unwrap()
}

/// The fixture run's settings (trajectory.json "args").
pub fn fixture_config() -> TrainConfig {
    let a = &trajectory()["args"];
    TrainConfig {
        learning_rate: a["lr"].as_f64().unwrap(),
        num_train_epochs: a["epochs"].as_f64().unwrap(),
        max_steps: None,
        per_device_train_batch_size: a["bs"].as_u64().unwrap() as usize,
        gradient_accumulation_steps: a["ga"].as_u64().unwrap() as usize,
        weight_decay: a["wd"].as_f64().unwrap(),
        adam_beta1: 0.9,
        adam_beta2: a["beta2"].as_f64().unwrap(),
        adam_epsilon: 1e-8,
        lr_scheduler_type: Schedule::Cosine,
        warmup_ratio: a["warmup_ratio"].as_f64().unwrap(),
        warmup_steps: None,
        max_grad_norm: a["max_grad_norm"].as_f64().unwrap(),
        seed: 42,
        shuffle: false,
        gradient_checkpointing: true,
    }
}

pub fn tensors(path: &std::path::Path) -> HashMap<String, Vec<f32>> {
    open_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_f32_vec()))
        .collect()
}

/// Worst `|a − b| / max|b|` over every tensor of the adapter.
pub fn compare(p: &LoraParams, values: &[f32], want: &HashMap<String, Vec<f32>>) -> f32 {
    let named = p.named();
    assert_eq!(named.len(), want.len(), "tensor count");
    let mut worst = 0f32;
    for (k, _, r) in named {
        let w = want
            .get(&k)
            .unwrap_or_else(|| panic!("{k} missing in the reference"));
        worst = worst.max(super::rel(&values[r], w));
    }
    worst
}
