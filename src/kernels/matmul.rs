//! `y = x · Wᵀ` for a weight `W [rows, cols]` stored in bf16, f16 or f32.
//!
//! One activation row (decode) runs [`matvec`]: rows of W split across threads, each row one
//! SIMD dot product, so every weight byte is read once per token. Many activation rows (prefill)
//! run [`matmul`]: W is widened to f32 a block of rows at a time and handed to the `gemm` crate,
//! whose packed micro-kernels are far faster than repeated dot products once there is reuse.

use half::{bf16, f16};
use rayon::prelude::*;

use super::dot::{dot_bf16, dot_f16, dot_f32};

/// A borrowed weight matrix, row-major `[rows, cols]`.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl WeightView<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(w) => w.len(),
            WeightView::F16(w) => w.len(),
            WeightView::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dot product of row `r` (of width `cols`) with `x`.
    #[inline]
    fn row_dot(&self, r: usize, cols: usize, x: &[f32]) -> f32 {
        let span = r * cols..(r + 1) * cols;
        match self {
            WeightView::F32(w) => dot_f32(&w[span], x),
            WeightView::F16(w) => dot_f16(&w[span], x),
            WeightView::BF16(w) => dot_bf16(&w[span], x),
        }
    }

    /// Rows `r0..r1` widened to f32 into `out`.
    fn rows_to_f32(&self, r0: usize, r1: usize, cols: usize, out: &mut [f32]) {
        let span = r0 * cols..r1 * cols;
        match self {
            WeightView::F32(w) => out.copy_from_slice(&w[span]),
            WeightView::F16(w) => out
                .par_chunks_mut(cols)
                .zip(w[span].par_chunks(cols))
                .for_each(|(o, i)| half::slice::HalfFloatSliceExt::convert_to_f32_slice(i, o)),
            WeightView::BF16(w) => out
                .par_chunks_mut(cols)
                .zip(w[span].par_chunks(cols))
                .for_each(|(o, i)| half::slice::HalfFloatSliceExt::convert_to_f32_slice(i, o)),
        }
    }
}

/// Rows per parallel task in [`matvec`]: large enough that scheduling costs nothing next to the
/// memory traffic, small enough that both cores stay busy to the end.
const MATVEC_CHUNK: usize = 64;

/// `y[r] = W[r,:] · x` for every row r.
pub fn matvec(w: WeightView, cols: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), cols);
    assert_eq!(w.len(), y.len() * cols);
    if y.len() < 2 * MATVEC_CHUNK {
        for (r, out) in y.iter_mut().enumerate() {
            *out = w.row_dot(r, cols, x);
        }
        return;
    }
    y.par_chunks_mut(MATVEC_CHUNK)
        .enumerate()
        .for_each(|(c, ys)| {
            let r0 = c * MATVEC_CHUNK;
            for (i, out) in ys.iter_mut().enumerate() {
                *out = w.row_dot(r0 + i, cols, x);
            }
        });
}

/// Output rows widened per gemm call in [`matmul`].
const GEMM_BLOCK_ROWS: usize = 512;

/// Fewer activation rows than this run as repeated [`matvec`]s (no reuse to exploit).
const GEMM_MIN_ROWS: usize = 4;

/// `y[t, r] = W[r,:] · x[t,:]` for `t` in `0..n_tokens`; `x` is `[n_tokens, cols]`, `y` is
/// `[n_tokens, rows]`, both row-major.
pub fn matmul(w: WeightView, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let n = x.len() / cols;
    assert_eq!(x.len(), n * cols);
    assert_eq!(y.len(), n * rows);
    assert_eq!(w.len(), rows * cols);
    if n < GEMM_MIN_ROWS {
        for (xt, yt) in x.chunks(cols).zip(y.chunks_mut(rows)) {
            matvec(w, cols, xt, yt);
        }
        return;
    }
    let mut scratch = match w {
        WeightView::F32(_) => Vec::new(),
        _ => vec![0f32; GEMM_BLOCK_ROWS.min(rows) * cols],
    };
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + GEMM_BLOCK_ROWS).min(rows);
        let block: &[f32] = match w {
            WeightView::F32(wf) => &wf[r0 * cols..r1 * cols],
            _ => {
                let s = &mut scratch[..(r1 - r0) * cols];
                w.rows_to_f32(r0, r1, cols, s);
                s
            }
        };
        // SAFETY: dst is y[:, r0..r1] (row stride `rows`), lhs is x [n, cols], rhs is blockᵀ
        // [cols, r1-r0]; all pointers and strides stay inside the slices asserted above.
        unsafe {
            gemm::gemm(
                n,
                r1 - r0,
                cols,
                y.as_mut_ptr().add(r0),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                block.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        r0 = r1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
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

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
        let n = x.len() / cols;
        let mut y = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                let mut s = 0f64;
                for c in 0..cols {
                    s += w[r * cols + c] as f64 * x[t * cols + c] as f64;
                }
                y[t * rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matvec_and_matmul_match_reference_in_every_dtype() {
        for (rows, cols, n) in [
            (1, 8, 1),
            (130, 33, 1),
            (700, 96, 3),
            (600, 160, 9),
            (37, 64, 17),
        ] {
            let wf = data(rows * cols, 3);
            let x = data(n * cols, 4);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let cases: [(WeightView, Vec<f32>); 3] = [
                (WeightView::F32(&wf), wf.clone()),
                (
                    WeightView::BF16(&wb),
                    wb.iter().map(|v| v.to_f32()).collect(),
                ),
                (
                    WeightView::F16(&wh),
                    wh.iter().map(|v| v.to_f32()).collect(),
                ),
            ];
            for (view, widened) in cases {
                let want = reference(&widened, rows, cols, &x);
                let mut got = vec![0f32; n * rows];
                matmul(view, rows, cols, &x, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{rows}x{cols} n={n}: {a} vs {b}");
                }
            }
        }
    }
}
