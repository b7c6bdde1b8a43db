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
