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

use super::dot::{WeightElem, BLOCK_ROWS, MAX_ROWS, PAIR_ROWS};
use super::quant::{self, QActs, QType};
use super::wide_acts::{self, QActs16, QuantActs};
use super::SharedOut;

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
        /// How activations are rounded to meet them.
        acts: QuantActs,
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
            WeightView::Quant { qs, t, .. } => qs.len() * 8 / t.bits(),
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

    /// `out[i] = W[r+i,:] · x` for `out.len()` consecutive rows from `r`.
    #[inline]
    fn dot_row_block(&self, r: usize, cols: usize, x: &[f32], out: &mut [f32]) {
        let span = r * cols..(r + out.len()) * cols;
        match self {
            WeightView::F32(w) => f32::dot_row_block(&w[span], x, out),
            WeightView::F16(w) => f16::dot_row_block(&w[span], x, out),
            WeightView::BF16(w) => bf16::dot_row_block(&w[span], x, out),
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
            WeightView::Quant { t, qs, d, .. } => {
                let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
                out.par_chunks_mut(cols).enumerate().for_each(|(i, o)| {
                    let r = r0 + i;
                    quant::dequantize_row(
                        *t,
                        &qs[r * rb..(r + 1) * rb],
                        &d[r * nb..(r + 1) * nb],
                        o,
                    )
                });
            }
        }
    }
}

/// Weight rows per parallel task on the streaming path: large enough that scheduling costs
/// nothing next to the memory traffic, small enough that both cores stay busy to the end and a
/// chunk stays in L2 while every group of activation rows passes over it.
pub(super) const ROW_CHUNK: usize = 64;

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
    if let WeightView::Quant { t, qs, d, acts } = w {
        assert_eq!(qs.len(), rows * t.row_bytes(cols));
        assert_eq!(d.len(), rows * quant::row_blocks(cols));
        if acts.wide(t, n) {
            return wide_matmul(t, qs, d, rows, cols, x, y, n);
        }
        return quantized_matmul(t, qs, d, rows, cols, x, y, n);
    }
    assert_eq!(w.len(), rows * cols);
    if n < GEMM_MIN_ROWS {
        stream(w, rows, cols, x, y, n);
    } else {
        gemm_widened(w, rows, cols, x, y, n);
    }
}

/// From this width on, one activation row goes against blocks of consecutive weight rows (see
/// [`WeightElem::dot_row_block`]); narrower rows stream faster one at a time, a single
/// sequential stream the prefetcher follows best. Measured on a Zen 4 (32 KB L1D), bf16, 2
/// threads, GB/s one row / blocks of 8: 3072 columns 32.2 / 29.2, 4096 23.2 / 35.9, 6144
/// 16.4 / 35.8, 8192 19.5 / 29.7 (best of 2–3 runs each).
pub(super) const WIDE_COLS: usize = 4096;

/// One pass over the stored weights per group of up to eight activation rows; from two rows on,
/// two weight rows at a time against groups of up to four (see [`WeightElem::dot_pair_rows`]).
fn stream(w: WeightView, rows: usize, cols: usize, x: &[f32], y: &mut [f32], n: usize) {
    // Fewer than GEMM_MIN_ROWS rows come here: their slices fit on the stack.
    let mut slots: [&[f32]; GEMM_MIN_ROWS] = [&[]; GEMM_MIN_ROWS];
    for (s, r) in slots.iter_mut().zip(x.chunks(cols)) {
        *s = r;
    }
    let xs = &slots[..n];
    let task = |r0: usize, out: &mut ChunkOut| {
        let len = out.len();
        if n == 1 && cols >= WIDE_COLS {
            let mut t = [0f32; BLOCK_ROWS];
            for i in (0..len).step_by(BLOCK_ROWS) {
                let k = BLOCK_ROWS.min(len - i);
                w.dot_row_block(r0 + i, cols, xs[0], &mut t[..k]);
                for (j, v) in t[..k].iter().enumerate() {
                    out.put(i + j, 0, &[*v]);
                }
            }
            return;
        }
        if n == 1 {
            for i in 0..len {
                let mut v = 0f32;
                w.dot_rows(r0 + i, cols, xs, std::slice::from_mut(&mut v));
                out.put(i, 0, &[v]);
            }
            return;
        }
        let mut tmp = [[0f32; PAIR_ROWS]; 2];
        for p in 0..len / 2 {
            for (g, group) in xs.chunks(PAIR_ROWS).enumerate() {
                let k = group.len();
                let [t0, t1] = &mut tmp;
                w.dot_pair_rows(r0 + 2 * p, cols, group, [&mut t0[..k], &mut t1[..k]]);
                out.put(2 * p, g * PAIR_ROWS, &t0[..k]);
                out.put(2 * p + 1, g * PAIR_ROWS, &t1[..k]);
            }
        }
        if len % 2 == 1 {
            let mut t = [0f32; MAX_ROWS];
            for (g, group) in xs.chunks(MAX_ROWS).enumerate() {
                let k = group.len();
                w.dot_rows(r0 + len - 1, cols, group, &mut t[..k]);
                out.put(len - 1, g * MAX_ROWS, &t[..k]);
            }
        }
    };
    by_row_chunks(rows, n, y, task);
}

/// The outputs of one chunk of weight rows inside `y [n, rows]`: the chunk's rows of every
/// token, written in place. (Writing `[row][token]` chunks and transposing afterwards allocated
/// a `rows × n` buffer per product: 32 MB for gate_up at 512 tokens, page faults included.)
pub(super) struct ChunkOut {
    y: *mut f32,
    rows: usize,
    n: usize,
    r0: usize,
    len: usize,
}

impl ChunkOut {
    /// Weight rows in this chunk.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Where this chunk's outputs of token `t` start: `len()` values from `y[t][r0]` are this
    /// chunk's to write.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn row(&mut self, t: usize) -> *mut f32 {
        assert!(t < self.n);
        // SAFETY: t < n and r0 < rows, so within y's n × rows values.
        unsafe { self.y.add(t * self.rows + self.r0) }
    }

    /// `y[t0 + j][r0 + i] = v[j]`.
    pub(super) fn put(&mut self, i: usize, t0: usize, v: &[f32]) {
        assert!(i < self.len && t0 + v.len() <= self.n);
        for (j, &x) in v.iter().enumerate() {
            // SAFETY: in bounds by the assert (y has n × rows values, r0 + len ≤ rows); no
            // other chunk writes row r0 + i.
            unsafe { *self.y.add((t0 + j) * self.rows + self.r0 + i) = x };
        }
    }
}

/// Runs `task(first_row, out)` over chunks of ROW_CHUNK weight rows in parallel, each writing
/// its rows' outputs of every token into `y [n, rows]`.
pub(super) fn by_row_chunks(
    rows: usize,
    n: usize,
    y: &mut [f32],
    task: impl Fn(usize, &mut ChunkOut) + Sync,
) {
    assert_eq!(y.len(), rows * n);
    // Each chunk writes only its own rows r0..r0 + len of y.
    let y = SharedOut::new(y);
    let run = |c: usize| {
        let r0 = c * ROW_CHUNK;
        let mut out = ChunkOut {
            y: y.get(),
            rows,
            n,
            r0,
            len: ROW_CHUNK.min(rows - r0),
        };
        task(r0, &mut out);
    };
    let chunks = rows.div_ceil(ROW_CHUNK);
    if chunks < 2 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
    }
}

/// Block-quantized weights against activations quantized to 8 bits: the integer kernels of
/// [`quant`] for decode and prefill alike. A chunk of weight rows (≤ 200 KB at 8 bits) stays in
/// L2 while every group of four quantized activation rows (≤ 12 KB for 3072 columns, in L1)
/// passes over it, so prefill is a blocked GEMM over the stored weights, not one matvec per
/// token. With AVX-512 VNNI and enough rows, the chunk is repacked first ([`super::qpanel`]).
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
    let run = |acts: &mut [QActs], y: &mut [f32]| {
        if n == 1 {
            acts[0].quantize(x);
        } else {
            acts.par_iter_mut()
                .zip(x.par_chunks(cols))
                .for_each(|(a, row)| a.quantize(row));
        }
        let acts = &*acts;
        #[cfg(target_arch = "x86_64")]
        if n >= super::qpanel::MIN_TOKENS && quant::vnni() {
            return by_row_chunks(rows, n, y, |r0, out| {
                kernel_rows(t, qs, d, cols, r0, out.len(), true, |qs, d, nb| {
                    super::qpanel::panels(t, qs, d, nb, acts, out)
                })
            });
        }
        // Decode reads the stored rows in place: the kernels take a partial last group with
        // masked loads (copying chunks to whole groups first made SmolLM2's decode, 576-wide
        // rows, 25-30 % slower). Batches copy: each row meets many activation rows, and there
        // the masked loads cost more than the copy (SmolLM2 q4 prefill, 256 tokens, kernel
        // samples: 7244 masked against 6770 + ~270 copying; 6537 for the padded layout before).
        let task = |r0: usize, out: &mut ChunkOut| {
            kernel_rows(t, qs, d, cols, r0, out.len(), n > 1, |qs, d, nb| {
                chunk_task(t, qs, d, nb, acts, out)
            })
        };
        by_row_chunks(rows, n, y, task);
    };
    with_buffer(&KEPT_ACTS, n, n, |acts| run(acts, y))
}

/// Rows `r0..r0 + len` of stored quantized weights (`rows × cols`) handed to `f` (`qs`, `d`,
/// blocks per row): as stored, or with `whole_groups`, rows ending in a partial group widened
/// into a per-thread buffer ([`quant::pad_rows`]) first: for batches, where the copy serves
/// every activation row (and VNNI's two-row tiles and panels read whole groups only).
#[allow(clippy::too_many_arguments)]
fn kernel_rows<R>(
    t: QType,
    qs: &[u8],
    d: &[f16],
    cols: usize,
    r0: usize,
    len: usize,
    whole_groups: bool,
    f: impl FnOnce(&[u8], &[f16], usize) -> R,
) -> R {
    let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
    let (qs, d) = (&qs[r0 * rb..(r0 + len) * rb], &d[r0 * nb..(r0 + len) * nb]);
    if !whole_groups || nb.is_multiple_of(8) {
        return f(qs, d, nb);
    }
    PADDED_ROWS.with(|buf| {
        let (pq, pd) = &mut *buf.borrow_mut();
        quant::pad_rows(t, qs, d, len, nb, pq, pd);
        f(pq, pd, nb.div_ceil(8) * 8)
    })
}

/// One chunk of weight rows (`nb` blocks a row) against every activation row.
fn chunk_task(t: QType, qs: &[u8], d: &[f16], nb: usize, acts: &[QActs], out: &mut ChunkOut) {
    let (len, n) = (out.len(), acts.len());
    let rb = nb * t.block_bytes();
    if n == 1 {
        // Decode: the chunk's rows in one call (per-row calls cost ~2 % of a q4 decode step:
        // one token of each in turn, 64 tokens, time ratios 0.973–0.992).
        let mut row = [0f32; ROW_CHUNK];
        quant::dot_row_run(t, qs, d, &acts[0], &mut row[..len]);
        for (i, v) in row[..len].iter().enumerate() {
            out.put(i, 0, &[*v]);
        }
        return;
    }
    let mut tmp = [0f32; 2 * quant::MAX_ROWS];
    for (g, group) in acts.chunks(quant::MAX_ROWS).enumerate() {
        let k = group.len();
        let mut refs = [&group[0]; quant::MAX_ROWS];
        for (slot, a) in refs.iter_mut().zip(group) {
            *slot = a;
        }
        let t0 = g * quant::MAX_ROWS;
        // Weight rows in pairs (see `dot_row_pair`); an odd last row alone.
        let mut i = 0;
        while i < len {
            if i + 1 < len {
                quant::dot_row_pair(
                    t,
                    &qs[i * rb..(i + 2) * rb],
                    &d[i * nb..(i + 2) * nb],
                    &refs[..k],
                    &mut tmp[..2 * k],
                );
                out.put(i, t0, &tmp[..k]);
                out.put(i + 1, t0, &tmp[k..2 * k]);
                i += 2;
            } else {
                quant::dot_rows(
                    t,
                    &qs[i * rb..(i + 1) * rb],
                    &d[i * nb..(i + 1) * nb],
                    &refs[..k],
                    &mut tmp[..k],
                );
                out.put(i, t0, &tmp[..k]);
                i += 1;
            }
        }
    }
}

/// Block-quantized weights against activations rounded to 16 bits ([`wide_acts`]): each chunk
/// of weight rows is read once per group of up to four activation rows.
#[allow(clippy::too_many_arguments)]
fn wide_matmul(
    t: QType,
    qs: &[u8],
    d: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    n: usize,
) {
    with_buffer(&KEPT_ACTS16, n, n, |acts| {
        if n == 1 {
            acts[0].quantize(x);
        } else {
            acts.par_iter_mut()
                .zip(x.par_chunks(cols))
                .for_each(|(a, row)| a.quantize(row));
        }
        let acts = &*acts;
        let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
        by_row_chunks(rows, n, y, |r0, out| {
            let len = out.len();
            let (qs, d) = (&qs[r0 * rb..(r0 + len) * rb], &d[r0 * nb..(r0 + len) * nb]);
            let mut tmp = [0f32; ROW_CHUNK * wide_acts::MAX_ROWS];
            for (g, group) in acts.chunks(wide_acts::MAX_ROWS).enumerate() {
                let k = group.len();
                let mut refs = [&group[0]; wide_acts::MAX_ROWS];
                for (slot, a) in refs.iter_mut().zip(group) {
                    *slot = a;
                }
                wide_acts::dot_rows(t, qs, d, &refs[..k], &mut tmp[..len * k]);
                for i in 0..len {
                    out.put(i, g * wide_acts::MAX_ROWS, &tmp[i * k..(i + 1) * k]);
                }
            }
        });
    })
}

thread_local! {
    static KEPT_ACTS: RefCell<Vec<QActs>> = const { RefCell::new(Vec::new()) };
    static KEPT_ACTS16: RefCell<Vec<QActs16>> = const { RefCell::new(Vec::new()) };
    static PADDED_ROWS: RefCell<(Vec<u8>, Vec<f16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Products of up to this many activation rows (decode steps, small batches) keep their
/// activation buffers on the thread for the next call, so that decode does not allocate;
/// longer ones allocate their own.
const KEEP_ROWS: usize = 16;

/// Runs `f` on a buffer of `len` values for a product of `n` activation rows: the thread's
/// `kept` one when `n <= KEEP_ROWS` and no product on this thread holds it already (a rayon
/// worker that stole a product started inside another), else a new one.
pub(super) fn with_buffer<T: Clone + Default, R>(
    kept: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    n: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut f = Some(f);
    let r = kept.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if n <= KEEP_ROWS => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            Some((f.take().unwrap())(&mut buf[..len]))
        }
        _ => None,
    });
    match r {
        Some(r) => r,
        None => (f.take().unwrap())(&mut vec![T::default(); len]),
    }
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

/// `dx = dy · W` (or `dx += dy · W` with `accumulate`) for `W [rows, cols]`: the input gradient
/// of `y = x · Wᵀ`, which training needs for every frozen projection. `dy` is `[n, rows]`, `dx`
/// `[n, cols]`. W is widened to f32 (quantized rows dequantized: the gradient flows through the
/// weights the forward pass used) a block of rows at a time and multiplied with `gemm`, so the
/// stored weight is read once per call and never copied whole.
pub fn matmul_transposed(
    w: WeightView,
    rows: usize,
    cols: usize,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let n = dy.len() / rows;
    assert_eq!(dy.len(), n * rows);
    assert_eq!(dx.len(), n * cols);
    if !accumulate {
        dx.fill(0.0);
    }
    let mut scratch = vec![0f32; GEMM_BLOCK_ROWS.min(rows) * cols];
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + GEMM_BLOCK_ROWS).min(rows);
        let block = &mut scratch[..(r1 - r0) * cols];
        w.rows_to_f32(r0, r1, cols, block);
        // SAFETY: dst is dx [n, cols]; lhs is dy[:, r0..r1] (row stride `rows`); rhs is the
        // widened block [r1-r0, cols]; every index stays inside the slices asserted above.
        unsafe {
            gemm::gemm(
                n,
                cols,
                r1 - r0,
                dx.as_mut_ptr(),
                1,
                cols as isize,
                true,
                dy.as_ptr().add(r0),
                1,
                rows as isize,
                block.as_ptr(),
                1,
                cols as isize,
                1.0,
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

    /// Quantized products (single rows for n = 1, row pairs for a few, and with AVX-512 VNNI
    /// from 32 rows the packed panels: odd row counts, several panels per row, partial passes)
    /// against the scalar kernel applied row by row, with 8-bit activations and with 16-bit ones
    /// ([`wide_acts`]: groups of four activation rows, and `auto` picking by the row count).
    /// Q8 codes include -128, which ggml's quantizer never writes but a Q8_0 file may hold.
    #[test]
    fn quantized_matmul_matches_the_scalar_kernel_row_by_row() {
        for (t, acts) in QType::ALL
            .into_iter()
            .flat_map(|t| [QuantActs::I8, QuantActs::I16, QuantActs::Auto].map(|a| (t, a)))
        {
            for (rows, cols, n) in [
                (3, 256, 1),
                (131, 512, 1),
                (131, 512, 3),
                (67, 288, 9),
                (70, 1100, 34),
                (17, 300, 35),
                (131, 2348, 33),
                (200, 768, 50),
            ] {
                let (rb, nb) = (t.row_bytes(cols), quant::row_blocks(cols));
                let wf = data(rows * cols, 5);
                let mut qs = vec![0u8; rows * rb];
                let mut d = vec![f16::ZERO; rows * nb];
                for r in 0..rows {
                    quant::quantize_row(
                        t,
                        &wf[r * cols..(r + 1) * cols],
                        &mut qs[r * rb..(r + 1) * rb],
                        &mut d[r * nb..(r + 1) * nb],
                    );
                }
                if t == QType::Q8 {
                    qs.iter_mut().step_by(7).for_each(|q| *q = 0x80);
                }
                let x = data(n * cols, 6);
                let mut got = vec![0f32; n * rows];
                let view = WeightView::Quant {
                    t,
                    qs: &qs,
                    d: &d,
                    acts,
                };
                matmul(view, rows, cols, &x, &mut got);
                for tok in 0..n {
                    let xt = &x[tok * cols..(tok + 1) * cols];
                    let (mut a8, mut a16) = (QActs::default(), QActs16::default());
                    a8.quantize(xt);
                    a16.quantize(xt);
                    for r in 0..rows {
                        let mut want = [0f32];
                        let (q, s) = (&qs[r * rb..(r + 1) * rb], &d[r * nb..(r + 1) * nb]);
                        if acts.wide(t, n) {
                            wide_acts::scalar_dot_rows(t, q, s, &[&a16], &mut want);
                        } else {
                            quant::scalar_dot_rows(t, q, s, &[&a8], &mut want);
                        }
                        let g = got[tok * rows + r];
                        let tol = 1e-5 * (cols as f32).sqrt() * want[0].abs().max(1.0);
                        assert!(
                            (g - want[0]).abs() <= tol,
                            "{t:?} {acts:?} {rows}x{cols} n={n} token {tok} row {r}: {g} vs {}",
                            want[0]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matvec_and_matmul_match_reference_in_every_dtype() {
        for (rows, cols, n) in [
            (1, 8, 1),
            (130, 33, 1),
            (700, 96, 3),
            (600, 160, 9),
            (37, 64, 17),
            // Wide rows: blocks of eight rows, and a chunk whose rows are not a multiple of it.
            (75, WIDE_COLS + 4, 1),
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

#[cfg(test)]
mod transposed_tests {
    use super::*;
    use crate::kernels::test_data as data;
    use crate::weights::Tensor;

    /// `dx = dy · W` against an f64 loop, for f32, bf16 and both quantized formats (through
    /// the weights the forward pass uses: the dequantized ones), with a partial row block.
    #[test]
    fn input_gradient_matches_reference() {
        let (rows, cols, n) = (GEMM_BLOCK_ROWS + 37, 300, 5);
        let w = data(rows * cols, 3);
        let dy = data(n * rows, 4);
        let t = Tensor::from_f32(vec![rows, cols], &w);
        let bf = Tensor::bf16_with(vec![rows, cols], |o| {
            for (o, v) in o.iter_mut().zip(&w) {
                *o = half::bf16::from_f32(*v);
            }
        });
        for (name, tensor) in [
            ("f32", t.clone()),
            ("bf16", bf),
            ("q8", t.quantize(QType::Q8).unwrap()),
            ("q4", t.quantize(QType::Q4).unwrap()),
            ("q4m", t.quantize(QType::Q4M).unwrap()),
        ] {
            let wf = tensor.to_f32_vec();
            let view = match tensor.as_quant() {
                Some((t, qs, d)) => WeightView::Quant {
                    t,
                    qs,
                    d,
                    acts: QuantActs::Auto,
                },
                None if tensor.dtype == crate::weights::DType::BF16 => {
                    WeightView::BF16(tensor.as_bf16())
                }
                None => WeightView::F32(tensor.as_f32()),
            };
            let mut dx = vec![1.0f32; n * cols];
            matmul_transposed(view, rows, cols, &dy, &mut dx, false);
            let mut acc = vec![1.0f32; n * cols];
            matmul_transposed(view, rows, cols, &dy, &mut acc, true);
            for t in 0..n {
                for c in 0..cols {
                    let want: f64 = (0..rows)
                        .map(|r| dy[t * rows + r] as f64 * wf[r * cols + c] as f64)
                        .sum();
                    let got = dx[t * cols + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{name} [{t},{c}]: {got} vs {want}"
                    );
                    assert!(
                        (acc[t * cols + c] as f64 - 1.0 - want).abs() < 1e-4 * (1.0 + want.abs())
                    );
                }
            }
        }
    }
}
