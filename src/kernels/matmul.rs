//! `y = x · Wᵀ` for a weight `W [rows, cols]` stored in bf16, f16 or f32.
//!
//! Few activation rows (decode, short prompts, small batches) stream the stored weights: rows of
//! W split across threads, each row one SIMD pass against up to eight activation rows, so every
//! weight byte is read once per eight tokens. Many activation rows (long prefill): W is widened
//! to f32 a block of rows at a time and handed to the `gemm` crate, whose packed micro-kernels
//! are far faster than dot products once there is enough reuse to pay for the widening.

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

use super::dot::{WeightElem, MAX_ROWS, PAIR_ROWS};
use super::quant::{self, QActs, QType};

/// A borrowed weight matrix, row-major `[rows, cols]`.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Block-quantized rows: values and scales as laid out by [`super::quant`].
    Quant {
        t: QType,
        qs: &'a [u8],
        d: &'a [f16],
    },
}

impl WeightView<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(w) => w.len(),
            WeightView::F16(w) => w.len(),
            WeightView::BF16(w) => w.len(),
            // Logical elements are not recoverable from the padded rows; callers compare
            // against rows × cols only for float views.
            WeightView::Quant { qs, t, .. } => match t {
                QType::Q8 => qs.len(),
                QType::Q4 => 2 * qs.len(),
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `out[j] = W[r,:] · xs[j]` for row `r` (of width `cols`).
    #[inline]
    fn dot_rows(&self, r: usize, cols: usize, xs: &[&[f32]], out: &mut [f32]) {
        let span = r * cols..(r + 1) * cols;
        match self {
            WeightView::F32(w) => f32::dot_rows(&w[span], xs, out),
            WeightView::F16(w) => f16::dot_rows(&w[span], xs, out),
            WeightView::BF16(w) => bf16::dot_rows(&w[span], xs, out),
            WeightView::Quant { .. } => unreachable!("quantized rows take quantized_matmul"),
        }
    }

    /// `outs[i][j] = W[r+i,:] · xs[j]` for rows `r` and `r+1`.
    #[inline]
    fn dot_pair_rows(&self, r: usize, cols: usize, xs: &[&[f32]], outs: [&mut [f32]; 2]) {
        let (a, b) = (r * cols..(r + 1) * cols, (r + 1) * cols..(r + 2) * cols);
        match self {
            WeightView::F32(w) => f32::dot_pair_rows([&w[a], &w[b]], xs, outs),
            WeightView::F16(w) => f16::dot_pair_rows([&w[a], &w[b]], xs, outs),
            WeightView::BF16(w) => bf16::dot_pair_rows([&w[a], &w[b]], xs, outs),
            WeightView::Quant { .. } => unreachable!("quantized rows take quantized_matmul"),
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
            WeightView::Quant { .. } => unreachable!("quantized rows take quantized_matmul"),
        }
    }
}

/// Weight rows per parallel task on the streaming path: large enough that scheduling costs
/// nothing next to the memory traffic, small enough that both cores stay busy to the end and a
/// chunk stays in L2 while every group of activation rows passes over it.
const ROW_CHUNK: usize = 64;

/// `y[r] = W[r,:] · x` for every row r.
pub fn matvec(w: WeightView, cols: usize, x: &[f32], y: &mut [f32]) {
    matmul(w, y.len(), cols, x, y);
}

/// Output rows widened per gemm call in [`matmul`].
const GEMM_BLOCK_ROWS: usize = 512;

/// From this many activation rows on, widening the weights for `gemm` pays for itself; below,
/// streaming the stored weights (two rows at a time against groups of four activation rows) is
/// faster. Measured on synthetic Phi-4-mini bf16 weights, 2 threads, prefill tok/s stream vs
/// gemm: 32 tokens 16.0 vs 11.5, 48 tokens 14.7 vs 12.6, 96 tokens 15.1 vs 16.3.
const GEMM_MIN_ROWS: usize = 64;

/// `y[t, r] = W[r,:] · x[t,:]` for `t` in `0..n_tokens`; `x` is `[n_tokens, cols]`, `y` is
/// `[n_tokens, rows]`, both row-major.
pub fn matmul(w: WeightView, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let n = x.len() / cols;
    assert_eq!(x.len(), n * cols);
    assert_eq!(y.len(), n * rows);
    if let WeightView::Quant { t, qs, d } = w {
        assert_eq!(qs.len(), rows * t.row_bytes(cols));
        assert_eq!(d.len(), rows * quant::row_blocks(cols));
        return quantized_matmul(t, qs, d, rows, cols, x, y, n);
    }
    assert_eq!(w.len(), rows * cols);
    if n < GEMM_MIN_ROWS {
        stream(w, rows, cols, x, y, n);
    } else {
        gemm_widened(w, rows, cols, x, y, n);
    }
}

/// One pass over the stored weights per group of up to eight activation rows; from two rows on,
/// two weight rows at a time against groups of up to four (see [`WeightElem::dot_pair_rows`]).
fn stream(w: WeightView, rows: usize, cols: usize, x: &[f32], y: &mut [f32], n: usize) {
    // Fewer than GEMM_MIN_ROWS rows come here: their slices fit on the stack.
    let mut slots: [&[f32]; GEMM_MIN_ROWS] = [&[]; GEMM_MIN_ROWS];
    for (s, r) in slots.iter_mut().zip(x.chunks(cols)) {
        *s = r;
    }
    let xs = &slots[..n];
    let task = |r0: usize, out: &mut [f32]| {
        // `out` is this chunk's outputs, row-major [row][token].
        if n == 1 {
            for (i, o) in out.iter_mut().enumerate() {
                w.dot_rows(r0 + i, cols, xs, std::slice::from_mut(o));
            }
            return;
        }
        let last = r0 + out.len() / n - 1;
        let mut pairs = out.chunks_exact_mut(2 * n);
        for (p, o) in pairs.by_ref().enumerate() {
            let (o0, o1) = o.split_at_mut(n);
            for (g, group) in xs.chunks(PAIR_ROWS).enumerate() {
                let span = g * PAIR_ROWS..g * PAIR_ROWS + group.len();
                w.dot_pair_rows(
                    r0 + 2 * p,
                    cols,
                    group,
                    [&mut o0[span.clone()], &mut o1[span]],
                );
            }
        }
        let rest = pairs.into_remainder();
        if !rest.is_empty() {
            let mut tmp = [0f32; MAX_ROWS];
            for (g, group) in xs.chunks(MAX_ROWS).enumerate() {
                w.dot_rows(last, cols, group, &mut tmp[..group.len()]);
                rest[g * MAX_ROWS..g * MAX_ROWS + group.len()].copy_from_slice(&tmp[..group.len()]);
            }
        }
    };
    by_row_chunks(rows, n, y, task);
}

/// Runs `task(first_row, out)` over chunks of ROW_CHUNK weight rows in parallel, `out` being
/// the chunk's outputs row-major [row][token], and leaves `y` as [token][row].
fn by_row_chunks(rows: usize, n: usize, y: &mut [f32], task: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 1 {
        // [rows][1] is already y's layout.
        if rows < 2 * ROW_CHUNK {
            task(0, y);
        } else {
            y.par_chunks_mut(ROW_CHUNK)
                .enumerate()
                .for_each(|(c, out)| task(c * ROW_CHUNK, out));
        }
        return;
    }
    let mut yt = vec![0f32; rows * n];
    yt.par_chunks_mut(ROW_CHUNK * n)
        .enumerate()
        .for_each(|(c, out)| task(c * ROW_CHUNK, out));
    transpose_into(&yt, y, rows, n);
}

/// `y[t][r] = yt[r][t]`, one output row per task: writes stay sequential and the strided reads
/// (one cache line per weight row, reused by the next tokens) stay in L2. A single-threaded
/// row-by-row scatter cost 9 % of a 512-token prefill.
fn transpose_into(yt: &[f32], y: &mut [f32], rows: usize, n: usize) {
    y.par_chunks_mut(rows).enumerate().for_each(|(t, out)| {
        for (r, v) in out.iter_mut().enumerate() {
            *v = yt[r * n + t];
        }
    });
}

/// Block-quantized weights against activations quantized to 8 bits: the integer kernels of
/// [`quant`] for decode and prefill alike. A chunk of weight rows (≤ 200 KB at 8 bits) stays in
/// L2 while every group of four quantized activation rows (≤ 12 KB for 3072 columns, in L1)
/// passes over it, so prefill is a blocked GEMM over the stored weights, not one matvec per
/// token.
#[allow(clippy::too_many_arguments)]
fn quantized_matmul(
    t: QType,
    qs: &[u8],
    d: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    n: usize,
) {
    let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
    let run = |acts: &mut [QActs], y: &mut [f32]| {
        if n == 1 {
            acts[0].quantize(x);
        } else {
            acts.par_iter_mut()
                .zip(x.par_chunks(cols))
                .for_each(|(a, row)| a.quantize(row));
        }
        let acts = &*acts;
        let task = |r0: usize, out: &mut [f32]| {
            // `out` is this chunk's outputs, row-major [row][token].
            let mut tmp = [0f32; quant::MAX_ROWS];
            for (g, group) in acts.chunks(quant::MAX_ROWS).enumerate() {
                let k = group.len();
                let mut refs = [&group[0]; quant::MAX_ROWS];
                for (slot, a) in refs.iter_mut().zip(group) {
                    *slot = a;
                }
                for (i, o) in out.chunks_mut(n).enumerate() {
                    let r = r0 + i;
                    quant::dot_rows(
                        t,
                        &qs[r * rb..(r + 1) * rb],
                        &d[r * nb..(r + 1) * nb],
                        &refs[..k],
                        &mut tmp[..k],
                    );
                    o[g * quant::MAX_ROWS..g * quant::MAX_ROWS + k].copy_from_slice(&tmp[..k]);
                }
            }
        };
        by_row_chunks(rows, n, y, task);
    };
    if n <= KEEP_ACT_ROWS {
        KEPT_ACTS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut kept) => {
                if kept.len() < n {
                    kept.resize_with(n, QActs::default);
                }
                run(&mut kept[..n], y)
            }
            // A product started inside another on this thread (a rayon worker that stole it).
            Err(_) => run(&mut vec![QActs::default(); n], y),
        })
    } else {
        run(&mut vec![QActs::default(); n], y)
    }
}

/// Products of up to this many activation rows (decode steps, small batches) quantize them into
/// buffers kept on the thread for the next call, so that decode does not allocate.
const KEEP_ACT_ROWS: usize = 16;

thread_local! {
    static KEPT_ACTS: RefCell<Vec<QActs>> = const { RefCell::new(Vec::new()) };
}

/// Widens W to f32 a block of rows at a time and multiplies with `gemm`'s packed kernels.
fn gemm_widened(w: WeightView, rows: usize, cols: usize, x: &[f32], y: &mut [f32], n: usize) {
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

    use crate::kernels::test_data as data;

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
