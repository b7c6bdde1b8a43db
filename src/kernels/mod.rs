//! Compute kernels: matrix-vector and matrix-matrix products over weights in their stored dtype,
//! and the small element-wise ops of the decoder.
//!
//! Every SIMD kernel has a scalar reference beside it and a test comparing the two. The variant is
//! picked once at run time from the CPU's features ([`cpu`]), never at compile time, so one binary
//! runs at full speed on any x86-64.

pub mod amx;
pub mod bf16;
pub mod dot;
pub mod encoder;
pub mod ggml;
pub mod matmul;
pub mod ops;
#[cfg(target_arch = "x86_64")]
mod qpanel;
pub mod quant;
pub mod wide_acts;

pub use matmul::{matmul, matmul_transposed, matvec, WeightView};

use std::sync::OnceLock;

/// A float buffer's base pointer handed to parallel jobs that each write their own disjoint
/// region of it while the owner waits for all of them (each user says which regions).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);
// SAFETY: only dereferenced by jobs writing disjoint regions, under the owner's borrow.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> SharedOut {
        SharedOut(buf.as_mut_ptr())
    }

    /// The base pointer. (A method, not the field: a closure that named the field would
    /// capture the bare pointer, which is not `Sync`.)
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The instruction-set level the kernels dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C (every x86-64 since Haswell).
    Avx2,
    /// Advanced SIMD (every aarch64).
    Neon,
}

static ISA: OnceLock<Isa> = OnceLock::new();

/// The best instruction set this CPU supports. `PHI4_ISA=scalar` forces the reference kernels.
pub fn cpu() -> Isa {
    *ISA.get_or_init(|| {
        if std::env::var("PHI4_ISA").is_ok_and(|v| v == "scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Isa::Neon;
            }
        }
        Isa::Scalar
    })
}

/// Whether AVX-512 F/BW/VL kernels may run: the CPU has them on top of [`Isa::Avx2`], and
/// `PHI4_ISA` asks for neither plain AVX2 (`avx2`) nor the scalar reference (`scalar`). Each
/// family of AVX-512 kernels adds the extension it needs ([`quant::vnni`], [`bf16::available`]).
pub fn avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            cpu() == Isa::Avx2
                && std::env::var("PHI4_ISA").map_or(true, |v| v != "avx2")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Deterministic values in [-0.5, 0.5) for kernel tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
