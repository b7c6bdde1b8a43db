//! The scalar reference kernels end to end: the same transformers parity with SIMD switched off
//! (`PHI4_ISA=scalar`), so machines without AVX2 or NEON get the same numbers. A test binary of
//! its own, because the kernel choice is made once per process.

mod common;

use common::{max_abs_diff, tiny_dir, Reference};
use phi4::kernels::{cpu, Isa};
use phi4::{Engine, SamplingParams};

#[test]
fn scalar_kernels_match_transformers() {
    std::env::set_var("PHI4_ISA", "scalar");
    assert_eq!(cpu(), Isa::Scalar);
    let r = Reference::load();
    let e = Engine::load(&tiny_dir()).unwrap();
    let prompt = r.ids("short", "prompt");
    let v = e.model.config.vocab_size;
    let (_, logits) = e.start(&prompt).unwrap();
    let want = &r.tensor("short.logits")[(prompt.len() - 1) * v..];
    assert!(max_abs_diff(&logits, want) < 2e-4);
    let want = r.ids("greedy_cross", "generated");
    let out = e
        .generate_ids(
            &r.ids("greedy_cross", "prompt"),
            &SamplingParams::greedy(want.len()),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(out.generated_ids, want);
}

#[test]
fn scalar_kernels_match_transformers_on_images_and_audio() {
    std::env::set_var("PHI4_ISA", "scalar");
    assert_eq!(cpu(), Isa::Scalar);
    let r = Reference::load_named("tiny-phi4mm");
    let e = Engine::load(&common::tiny_mm_dir()).unwrap();
    for mode in ["image", "audio", "image_audio"] {
        common::check_mode_greedy(&e, &r, mode);
    }
}

/// LoRA training with the scalar kernels: a window's gradients and a short run match PEFT as
/// closely as with SIMD.
#[test]
fn scalar_kernels_match_peft_training() {
    use common::lora::*;
    use phi4::train::{LoraParams, Trainer};
    std::env::set_var("PHI4_ISA", "scalar");
    assert_eq!(cpu(), Isa::Scalar);
    let model = tiny_model();
    let samples = reference_samples();
    let params = LoraParams::load_peft(&model, &lora_dir().join("init_randB")).unwrap();
    let t = Trainer::new(&model, fixture_config(), params, samples.len()).unwrap();
    let (_, _, _, grads) = t.gradients(&samples, &t.window(0), 0).unwrap();
    let want = tensors(&lora_dir().join("grads_randB.safetensors"));
    assert!(compare(&t.params, &grads, &want) < 2e-5);
    let params = LoraParams::load_peft(&model, &lora_dir().join("init")).unwrap();
    let mut t = Trainer::new(&model, fixture_config(), params, samples.len()).unwrap();
    let traj = trajectory();
    for want in traj["trajectory"].as_array().unwrap() {
        let log = t.step(&samples).unwrap();
        let b = want["loss"].as_f64().unwrap();
        assert!(
            (log.loss - b).abs() / b < 1e-5,
            "step {}: {} vs {b}",
            log.step,
            log.loss
        );
    }
}
