//! A decode step of the model allocates nothing once its buffers have grown: every heap
//! allocation in the process is counted while steps run. (Its own test binary: the counting
//! allocator is process-wide, and no other test may run beside it.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use common::tiny_dir;
use phi4::config::Phi3Config;
use phi4::kernels::bf16::Bf16Acts::{Bf16, F32};
use phi4::model::{KvType, Logits, Phi3ForCausalLM, Recipe, RopeTable};
use phi4::weights::Checkpoint;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        System.realloc(p, l, size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_allocate_nothing() {
    let dir = tiny_dir();
    let cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    // Run from inside the pool: a call from outside queues each parallel section on rayon's
    // shared injector, whose own blocks are allocated as it fills (rayon's, not ours).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // Every worker of both pools (this one and rayon's global one, which loading and quantizing
    // use) has started: a worker's first look for work registers it with the epoch GC of its
    // deque, an allocation of crossbeam's that a late-scheduled thread would make mid-count.
    pool.broadcast(|_| ());
    rayon::broadcast(|_| ());
    // The fixture, and 2 full-width layers (their products run in parallel row chunks).
    let mut wide = Phi3Config::phi4_mini();
    wide.num_hidden_layers = 2;
    let cases = [None, Some(Recipe::Q8), Some(Recipe::Q4)]
        .into_iter()
        .flat_map(|r| [KvType::F32, KvType::F16, KvType::Q8].map(|kv| (false, r, kv, F32)))
        .chain([
            (true, Some(Recipe::Q4), KvType::Q8, F32),
            (false, None, KvType::F16, Bf16),
        ]);
    for (full_width, recipe, kv, acts) in cases {
        {
            let mut m = if full_width {
                Phi3ForCausalLM::synthetic(wide.clone(), 3)
            } else {
                Phi3ForCausalLM::load(cfg.clone(), &ckpt).unwrap()
            };
            if let Some(r) = recipe {
                m.quantize(r).unwrap();
            }
            m.kv_cache = kv;
            m.set_bf16_acts(acts);
            let counted = pool.install(|| {
                let mut cache = m.new_cache();
                let mut logits = Vec::new();
                let prompt: Vec<u32> = (0..20).map(|i| i * 31 % 500).collect();
                m.forward_into(
                    &prompt,
                    &mut cache,
                    RopeTable::Short,
                    Logits::Last,
                    None,
                    &mut logits,
                )
                .unwrap();
                let mut step = |tok: u32| {
                    m.forward_into(
                        &[tok],
                        &mut cache,
                        RopeTable::Short,
                        Logits::Last,
                        None,
                        &mut logits,
                    )
                    .unwrap();
                };
                // Warm-up: every worker's kept buffers reach their size.
                for t in 0..10 {
                    step(t);
                }
                let before = ALLOCATIONS.load(Relaxed);
                // Positions 30..60: inside the first KV page, so no page is added.
                for t in 0..30 {
                    step(100 + t);
                }
                ALLOCATIONS.load(Relaxed) - before
            });
            assert_eq!(
                counted, 0,
                "{recipe:?} weights, {kv:?} cache, {acts:?} activations, full width: {full_width}"
            );
        }
    }
    // The counter sees allocations at all (the check above can fail).
    let before = ALLOCATIONS.load(Relaxed);
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(ALLOCATIONS.load(Relaxed) > before && v.len() == 10);
}
