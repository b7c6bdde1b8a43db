//! Helpers shared by the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use phi4::weights::open_safetensors;

pub mod o200k;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-phi4")
}

/// transformers' outputs on the tiny checkpoint (written by scripts/make_fixtures.py).
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: serde_json::Value,
}

impl Reference {
    pub fn load() -> Reference {
        let tensors = open_safetensors(&fixtures().join("tiny-phi4-reference.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, (t.shape.clone(), t.to_f32_vec())))
            .collect();
        let meta = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("tiny-phi4-reference.json")).unwrap(),
        )
        .unwrap();
        Reference { tensors, meta }
    }

    pub fn tensor(&self, name: &str) -> &[f32] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("no reference {name}"))
            .1
    }

    pub fn ids(&self, case: &str, key: &str) -> Vec<u32> {
        self.meta[case][key]
            .as_array()
            .unwrap_or_else(|| panic!("no {case}.{key}"))
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

/// Largest absolute difference, asserting equal lengths.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
