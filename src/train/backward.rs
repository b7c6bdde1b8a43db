//! One sample's forward and backward pass through the decoder with LoRA deltas on its
//! projections: the gradient of the summed token cross-entropy with respect to every LoRA
//! matrix, written for this decoder op by op (llm.c style) rather than through an autograd tape.
//!
//! Forward, per layer (what transformers' `Phi3DecoderLayer` computes):
//! `n1 = rms(x0)·w1`, `qkv = n1·Wqkvᵀ + s·B(A·n1)`, rotary on q and k, causal GQA attention
//! `o`, `x1 = x0 + o·Woᵀ + …`, `n2 = rms(x1)·w2`, `gu = n2·Wguᵀ + …`, `a = silu(g)·u`,
//! `x2 = x1 + a·Wdownᵀ + …`; then the final norm and the tied LM head at the labelled positions.
//!
//! Memory: the frozen weights are only read (their input gradient `dY·W` widens a block of rows
//! at a time, quantized ones included); attention is recomputed a block of 64 queries at a time
//! in the backward pass, so no `[tokens × tokens]` matrix is held; the logits exist
//! [`LOGIT_ROWS`] rows at a time. With checkpointing only each layer's input is kept between
//! the two passes and the layer is run again just before its backward step.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::lora::{LoraModule, LoraParams};
use crate::kernels::ops::{rms_norm, rope_neox, silu_mul, softmax};
use crate::model::{Linear, Phi3ForCausalLM, RopeTable};

/// Query rows per attention block (the scores of a block are `QUERY_BLOCK × tokens` floats).
const QUERY_BLOCK: usize = 64;
/// Labelled positions whose logits exist at once (`LOGIT_ROWS × vocab` floats).
pub const LOGIT_ROWS: usize = 256;
/// Label value of a position that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// `c = alpha · op(a) · op(b)` (`c += …` with `accumulate`), all row-major: `op(a)` is
/// `[m, k]` (stored `[k, m]` when `ta`), `op(b)` is `[k, n]` (stored `[n, k]` when `tb`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    parallel: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the lengths asserted above cover every element the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Products big enough to be worth both cores.
fn big(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= 1 << 18
}

/// LoRA dropout, drawn from a counter-based hash so the backward pass (and a recomputed
/// forward) sees the same mask without storing it.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    fn keep(&self, module: usize, i: usize) -> bool {
        let mut z = self.seed ^ ((module as u64) << 40) ^ (i as u64);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) >= self.p
    }

    /// `x` with dropped elements zeroed and the rest scaled by `1/(1-p)` (also the backward's
    /// mask for the same module).
    fn apply(&self, module: usize, x: &[f32]) -> Vec<f32> {
        let s = 1.0 / (1.0 - self.p);
        x.iter()
            .enumerate()
            .map(|(i, v)| if self.keep(module, i) { v * s } else { 0.0 })
            .collect()
    }
}

/// What one layer's backward step needs from its forward step.
pub struct LayerActs {
    x0: Vec<f32>,
    n1: Vec<f32>,
    inv1: Vec<f32>,
    /// After rotary.
    qkv: Vec<f32>,
    o: Vec<f32>,
    x1: Vec<f32>,
    n2: Vec<f32>,
    inv2: Vec<f32>,
    /// gate | up before the activation.
    gu: Vec<f32>,
    act: Vec<f32>,
}

/// One sample's passes: the model, the adapter being trained and the rotary table the sample's
/// batch runs with (transformers picks it from the padded batch length).
pub struct Pass<'a> {
    pub model: &'a Phi3ForCausalLM,
    pub lora: &'a LoraParams,
    pub table: RopeTable,
    /// `None` when training without dropout (or evaluating).
    pub dropout: Option<Dropout>,
    /// The LM head transposed once for the whole run ([`Linear::transposed_bf16`]), if the
    /// bf16 kernels compute its input gradient.
    pub head_t: Option<&'a Linear>,
}

/// One projection with its LoRA delta.
struct Proj<'a> {
    lin: &'a Linear,
    module: Option<(usize, &'a LoraModule)>,
}

impl Pass<'_> {
    fn proj(&self, l: usize, t: usize) -> Proj<'_> {
        let layer = &self.model.model.layers[l];
        let lin = layer.linears()[t].1;
        let module = self.lora.module(l, t).map(|m| {
            let idx = self.lora.modules.iter().position(|x| std::ptr::eq(x, m));
            (idx.unwrap_or(0), m)
        });
        Proj { lin, module }
    }

    fn dropped<'x>(&self, idx: usize, x: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
        match self.dropout {
            Some(d) if d.p > 0.0 => std::borrow::Cow::Owned(d.apply(idx, x)),
            _ => std::borrow::Cow::Borrowed(x),
        }
    }

    /// `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ`.
    fn proj_forward(&self, p: &Proj, x: &[f32], y: &mut [f32]) {
        p.lin.forward(x, y);
        let Some((idx, m)) = p.module else { return };
        let (r, n) = (self.lora.settings.r, x.len() / m.din);
        let v = &self.lora.values;
        let xd = self.dropped(idx, x);
        let mut t = vec![0f32; n * r];
        mm(
            n,
            r,
            m.din,
            &xd,
            false,
            &v[m.a.clone()],
            true,
            &mut t,
            false,
            1.0,
            big(n, r, m.din),
        );
        let s = self.lora.settings.scale();
        mm(
            n,
            m.dout,
            r,
            &t,
            false,
            &v[m.b.clone()],
            true,
            y,
            true,
            s,
            big(n, m.dout, r),
        );
    }

    /// Given `dy`, writes `dx` and adds the LoRA gradients to `grads` (laid out as the values).
    fn proj_backward(&self, p: &Proj, x: &[f32], dy: &[f32], dx: &mut [f32], grads: &mut [f32]) {
        p.lin.backward_input(dy, dx);
        let Some((idx, m)) = p.module else { return };
        let (r, n) = (self.lora.settings.r, x.len() / m.din);
        let s = self.lora.settings.scale();
        let v = &self.lora.values;
        let (a, b) = (&v[m.a.clone()], &v[m.b.clone()]);
        let xd = self.dropped(idx, x);
        let mut t = vec![0f32; n * r];
        mm(
            n,
            r,
            m.din,
            &xd,
            false,
            a,
            true,
            &mut t,
            false,
            1.0,
            big(n, r, m.din),
        );
        // dB += s·dyᵀ·t, dt = s·dy·B, dA += dtᵀ·drop(x), dx += drop'(dt·A).
        mm(
            m.dout,
            r,
            n,
            dy,
            true,
            &t,
            false,
            &mut grads[m.b.clone()],
            true,
            s,
            big(m.dout, r, n),
        );
        let mut dt = vec![0f32; n * r];
        mm(
            n,
            r,
            m.dout,
            dy,
            false,
            b,
            false,
            &mut dt,
            false,
            s,
            big(n, r, m.dout),
        );
        mm(
            r,
            m.din,
            n,
            &dt,
            true,
            &xd,
            false,
            &mut grads[m.a.clone()],
            true,
            1.0,
            big(r, m.din, n),
        );
        let mut dxl = vec![0f32; n * m.din];
        mm(
            n,
            m.din,
            r,
            &dt,
            false,
            a,
            false,
            &mut dxl,
            false,
            1.0,
            big(n, m.din, r),
        );
        match self.dropout {
            Some(d) if d.p > 0.0 => {
                let sc = 1.0 / (1.0 - d.p);
                for (i, (o, g)) in dx.iter_mut().zip(&dxl).enumerate() {
                    if d.keep(idx, i) {
                        *o += g * sc;
                    }
                }
            }
            _ => dx.iter_mut().zip(&dxl).for_each(|(o, g)| *o += g),
        }
    }

    /// cos and sin of every position `0..n`, `n × half` each.
    fn rotary(&self, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.model.rope.half_dim();
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        for (p, (c, s)) in cos.chunks_mut(half).zip(sin.chunks_mut(half)).enumerate() {
            self.model.rope.cos_sin(self.table, p, c, s);
        }
        (cos, sin)
    }

    /// The token embeddings of a sample.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let cfg = &self.model.config;
        let h = cfg.hidden_size;
        let mut x = vec![0f32; tokens.len() * h];
        for (row, &t) in x.chunks_mut(h).zip(tokens) {
            if t as usize >= cfg.vocab_size {
                bail!(
                    "token id {t} is outside the model's vocabulary ({})",
                    cfg.vocab_size
                );
            }
            self.model.model.embed_tokens.read_f32(t as usize * h, row);
        }
        Ok(x)
    }

    /// Layer `l` on `x` (in place), returning what its backward step needs.
    pub fn layer_forward(&self, l: usize, x: &mut [f32], rot: &(Vec<f32>, Vec<f32>)) -> LayerActs {
        let cfg = &self.model.config;
        let layer = &self.model.model.layers[l];
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        let n = x.len() / h;
        let x0 = x.to_vec();
        let (n1, inv1) = norm_rows(&x0, &layer.input_layernorm, eps);
        let mut qkv = vec![0f32; n * cfg.qkv_dim()];
        self.proj_forward(&self.proj(l, 0), &n1, &mut qkv);
        self.rotate(&mut qkv, rot, false);
        let o = self.attention(&qkv, n);
        let mut proj = vec![0f32; n * h];
        self.proj_forward(&self.proj(l, 1), &o, &mut proj);
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        let x1 = x.to_vec();
        let (n2, inv2) = norm_rows(&x1, &layer.post_attention_layernorm, eps);
        let i = cfg.intermediate_size;
        let mut gu = vec![0f32; n * 2 * i];
        self.proj_forward(&self.proj(l, 2), &n2, &mut gu);
        let mut act = vec![0f32; n * i];
        for (a, g) in act.chunks_mut(i).zip(gu.chunks(2 * i)) {
            a.copy_from_slice(&g[..i]);
            silu_mul(a, &g[i..]);
        }
        self.proj_forward(&self.proj(l, 3), &act, &mut proj);
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        LayerActs {
            x0,
            n1,
            inv1,
            qkv,
            o,
            x1,
            n2,
            inv2,
            gu,
            act,
        }
    }

    /// Given `dx` = the gradient at the layer's output, leaves the gradient at its input there
    /// and adds the layer's LoRA gradients to `grads`.
    pub fn layer_backward(
        &self,
        l: usize,
        a: &LayerActs,
        dx: &mut [f32],
        rot: &(Vec<f32>, Vec<f32>),
        grads: &mut [f32],
    ) {
        let cfg = &self.model.config;
        let layer = &self.model.model.layers[l];
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let n = dx.len() / h;
        let mut d_act = vec![0f32; n * i];
        self.proj_backward(&self.proj(l, 3), &a.act, dx, &mut d_act, grads);
        let mut dgu = vec![0f32; n * 2 * i];
        silu_mul_backward(&a.gu, &d_act, &mut dgu, i);
        let mut dn = vec![0f32; n * h];
        self.proj_backward(&self.proj(l, 2), &a.n2, &dgu, &mut dn, grads);
        norm_backward(&a.x1, &layer.post_attention_layernorm, &a.inv2, &dn, dx);
        let mut d_o = vec![0f32; a.o.len()];
        self.proj_backward(&self.proj(l, 1), &a.o, dx, &mut d_o, grads);
        let mut dqkv = self.attention_backward(&a.qkv, &a.o, &d_o, n);
        self.rotate(&mut dqkv, rot, true);
        self.proj_backward(&self.proj(l, 0), &a.n1, &dqkv, &mut dn, grads);
        norm_backward(&a.x0, &layer.input_layernorm, &a.inv1, &dn, dx);
    }

    /// Rotary on the q and k heads of every row (`transpose`: its transpose, for gradients).
    fn rotate(&self, qkv: &mut [f32], rot: &(Vec<f32>, Vec<f32>), transpose: bool) {
        let cfg = &self.model.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let half = self.model.rope.half_dim();
        let mut neg = vec![0f32; half];
        for (p, row) in qkv.chunks_mut(cfg.qkv_dim()).enumerate() {
            let (c, s) = (
                &rot.0[p * half..(p + 1) * half],
                &rot.1[p * half..(p + 1) * half],
            );
            let s = if transpose {
                neg.iter_mut().zip(s).for_each(|(o, v)| *o = -v);
                &neg[..]
            } else {
                s
            };
            for head in row[..(nh + nkv) * hd].chunks_mut(hd) {
                rope_neox(head, c, s);
            }
        }
    }

    /// Packed `[n, hd]` copies of q head `h`, and of k and v of kv head `g`.
    fn heads(&self, qkv: &[f32], n: usize, h: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let cfg = &self.model.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let g = h / (nh / nkv);
        let w = cfg.qkv_dim();
        let col = |c: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|t| &qkv[t * w + c..t * w + c + hd])
                .copied()
                .collect()
        };
        (col(h * hd), col((nh + g) * hd), col((nh + nkv + g) * hd))
    }

    /// Scores then probabilities of queries `q0..q1` against keys `0..q1` (causal).
    fn probs(&self, q: &[f32], k: &[f32], q0: usize, q1: usize, hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let b = q1 - q0;
        let mut p = vec![0f32; b * q1];
        mm(
            b,
            q1,
            hd,
            &q[q0 * hd..q1 * hd],
            false,
            k,
            true,
            &mut p,
            false,
            scale,
            false,
        );
        for (t, row) in p.chunks_mut(q1).enumerate() {
            let visible = q0 + t + 1;
            softmax(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        p
    }

    /// Causal GQA attention of every row: `[n, heads · hd]`.
    fn attention(&self, qkv: &[f32], n: usize) -> Vec<f32> {
        let cfg = &self.model.config;
        let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim());
        let per_head: Vec<Vec<f32>> = (0..nh)
            .into_par_iter()
            .map(|h| {
                let (q, k, v) = self.heads(qkv, n, h);
                let mut o = vec![0f32; n * hd];
                for q0 in (0..n).step_by(QUERY_BLOCK) {
                    let q1 = (q0 + QUERY_BLOCK).min(n);
                    let p = self.probs(&q, &k, q0, q1, hd);
                    mm(
                        q1 - q0,
                        hd,
                        q1,
                        &p,
                        false,
                        &v,
                        false,
                        &mut o[q0 * hd..q1 * hd],
                        false,
                        1.0,
                        false,
                    );
                }
                o
            })
            .collect();
        let mut out = vec![0f32; n * nh * hd];
        for (h, o) in per_head.iter().enumerate() {
            for t in 0..n {
                out[t * nh * hd + h * hd..][..hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
            }
        }
        out
    }

    /// Gradient at (rotated) q, k, v given the gradient `d_o` at the attention output `o`.
    fn attention_backward(&self, qkv: &[f32], o: &[f32], d_o: &[f32], n: usize) -> Vec<f32> {
        let cfg = &self.model.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        let w = nh * hd;
        let per_head: Vec<[Vec<f32>; 3]> = (0..nh)
            .into_par_iter()
            .map(|h| {
                let (q, k, v) = self.heads(qkv, n, h);
                let col = |m: &[f32]| -> Vec<f32> {
                    (0..n)
                        .flat_map(|t| &m[t * w + h * hd..t * w + (h + 1) * hd])
                        .copied()
                        .collect()
                };
                let (oh, doh) = (col(o), col(d_o));
                let (mut dq, mut dk, mut dv) =
                    (vec![0f32; n * hd], vec![0f32; n * hd], vec![0f32; n * hd]);
                for q0 in (0..n).step_by(QUERY_BLOCK) {
                    let q1 = (q0 + QUERY_BLOCK).min(n);
                    let b = q1 - q0;
                    let p = self.probs(&q, &k, q0, q1, hd);
                    let dob = &doh[q0 * hd..q1 * hd];
                    let mut ds = vec![0f32; b * q1];
                    mm(b, q1, hd, dob, false, &v, true, &mut ds, false, 1.0, false);
                    for t in 0..b {
                        let row = q0 + t;
                        let dsum: f32 = (0..hd).map(|c| doh[row * hd + c] * oh[row * hd + c]).sum();
                        for (s, pv) in ds[t * q1..(t + 1) * q1].iter_mut().zip(&p[t * q1..]) {
                            *s = pv * (*s - dsum);
                        }
                    }
                    mm(
                        b,
                        hd,
                        q1,
                        &ds,
                        false,
                        &k,
                        false,
                        &mut dq[q0 * hd..q1 * hd],
                        false,
                        scale,
                        false,
                    );
                    mm(
                        q1,
                        hd,
                        b,
                        &ds,
                        true,
                        &q[q0 * hd..q1 * hd],
                        false,
                        &mut dk,
                        true,
                        scale,
                        false,
                    );
                    mm(q1, hd, b, &p, true, dob, false, &mut dv, true, 1.0, false);
                }
                [dq, dk, dv]
            })
            .collect();
        let width = cfg.qkv_dim();
        let group = nh / nkv;
        let mut d = vec![0f32; n * width];
        for (h, [dq, dk, dv]) in per_head.iter().enumerate() {
            let g = h / group;
            for t in 0..n {
                let row = &mut d[t * width..(t + 1) * width];
                let src = t * hd..(t + 1) * hd;
                row[h * hd..(h + 1) * hd].copy_from_slice(&dq[src.clone()]);
                for (o, v) in row[(nh + g) * hd..][..hd].iter_mut().zip(&dk[src.clone()]) {
                    *o += v;
                }
                for (o, v) in row[(nh + nkv + g) * hd..][..hd].iter_mut().zip(&dv[src]) {
                    *o += v;
                }
            }
        }
        d
    }

    /// Summed cross-entropy of the positions whose next token has a label, each term divided
    /// by `denom`; writes the gradient of that at the last layer's output (pre-norm) into `dx`.
    /// Returns the (scaled) loss and the number of labelled positions.
    pub fn head(
        &self,
        x: &[f32],
        labels: &[i32],
        denom: f32,
        dx: &mut [f32],
    ) -> Result<(f64, usize)> {
        let cfg = &self.model.config;
        let (h, vocab, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps as f32);
        dx.fill(0.0);
        let rows: Vec<(usize, usize)> = (0..labels.len().saturating_sub(1))
            .filter(|&t| labels[t + 1] != IGNORE)
            .map(|t| (t, labels[t + 1]))
            .map(|(t, y)| {
                if y < 0 || y as usize >= vocab {
                    bail!("label {y} is outside the model's vocabulary ({vocab})");
                }
                Ok((t, y as usize))
            })
            .collect::<Result<_>>()?;
        let mut loss = 0f64;
        let norm = &self.model.model.norm;
        let mut logits = Vec::new();
        for chunk in rows.chunks(LOGIT_ROWS) {
            let c = chunk.len();
            let xs: Vec<f32> = chunk
                .iter()
                .flat_map(|&(t, _)| &x[t * h..(t + 1) * h])
                .copied()
                .collect();
            let (normed, inv) = norm_rows(&xs, norm, eps);
            logits.resize(c * vocab, 0.0);
            self.model.lm_head.forward(&normed, &mut logits);
            // Cross-entropy and its gradient `(softmax − onehot) / denom` in place, with the
            // SIMD softmax: the row's largest probability is `1 / Σ exp(v − max)`, which gives
            // the log-sum-exp without a second pass.
            let per_row: Vec<f64> = logits
                .par_chunks_mut(vocab)
                .zip(chunk)
                .map(|(row, &(_, y))| {
                    let (imax, max) = row.iter().copied().enumerate().fold(
                        (0, f32::NEG_INFINITY),
                        |a, (i, v)| if v > a.1 { (i, v) } else { a },
                    );
                    let target = row[y];
                    softmax(row);
                    let lse = max as f64 - (row[imax] as f64).ln();
                    let inv = 1.0 / denom;
                    for v in row.iter_mut() {
                        *v *= inv;
                    }
                    row[y] -= inv;
                    lse - target as f64
                })
                .collect();
            loss += per_row.iter().sum::<f64>() / denom as f64;
            let mut dn = vec![0f32; c * h];
            match self.head_t {
                Some(t) => t.forward(&logits, &mut dn),
                None => self.model.lm_head.backward_input(&logits, &mut dn),
            }
            let mut dxs = vec![0f32; c * h];
            norm_backward(&xs, norm, &inv, &dn, &mut dxs);
            for (k, &(t, _)) in chunk.iter().enumerate() {
                dx[t * h..(t + 1) * h].copy_from_slice(&dxs[k * h..(k + 1) * h]);
            }
        }
        Ok((loss, rows.len()))
    }

    /// The loss of one sample (summed token CE / `denom`), its gradient added to `grads`.
    /// `checkpoint`: keep only each layer's input between the passes and run the layer again
    /// before its backward step (one more forward, a fraction of the memory).
    pub fn sample(
        &self,
        tokens: &[u32],
        labels: &[i32],
        denom: f32,
        checkpoint: bool,
        grads: &mut [f32],
    ) -> Result<(f64, usize)> {
        if tokens.len() != labels.len() {
            bail!("{} tokens but {} labels", tokens.len(), labels.len());
        }
        let n_layers = self.model.model.layers.len();
        let rot = self.rotary(tokens.len());
        let mut x = self.embed(tokens)?;
        let mut saved: Vec<LayerActs> = Vec::new();
        let mut inputs: Vec<Vec<f32>> = Vec::new();
        for l in 0..n_layers {
            if checkpoint {
                inputs.push(x.clone());
                self.layer_forward(l, &mut x, &rot);
            } else {
                saved.push(self.layer_forward(l, &mut x, &rot));
            }
        }
        let mut dx = vec![0f32; x.len()];
        let (loss, count) = self.head(&x, labels, denom, &mut dx)?;
        drop(x);
        for l in (0..n_layers).rev() {
            let acts = if checkpoint {
                let mut xi = inputs.pop().expect("one input per layer");
                self.layer_forward(l, &mut xi, &rot)
            } else {
                saved.pop().expect("one record per layer")
            };
            self.layer_backward(l, &acts, &mut dx, &rot, grads);
        }
        Ok((loss, count))
    }

    /// The loss alone (evaluation): summed token CE / `denom`, and the labelled positions.
    pub fn loss(&self, tokens: &[u32], labels: &[i32], denom: f32) -> Result<(f64, usize)> {
        let rot = self.rotary(tokens.len());
        let mut x = self.embed(tokens)?;
        for l in 0..self.model.model.layers.len() {
            self.layer_forward(l, &mut x, &rot);
        }
        let mut dx = vec![0f32; x.len()];
        self.head(&x, labels, denom, &mut dx)
    }
}

/// The gradient at gate | up (`gu`, rows of `2i`) of `silu(gate)·up`, given `d_act` (rows of `i`).
fn silu_mul_backward(gu: &[f32], d_act: &[f32], dgu: &mut [f32], i: usize) {
    for ((dg, g), da) in dgu
        .chunks_mut(2 * i)
        .zip(gu.chunks(2 * i))
        .zip(d_act.chunks(i))
    {
        let (dgate, dup) = dg.split_at_mut(i);
        for k in 0..i {
            let (gv, uv) = (g[k], g[i + k]);
            let sig = 1.0 / (1.0 + (-gv).exp());
            dgate[k] = da[k] * uv * sig * (1.0 + gv * (1.0 - sig));
            dup[k] = da[k] * gv * sig;
        }
    }
}

/// RMSNorm of every row, and each row's `1/sqrt(mean(x²) + eps)`.
fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    let mut inv = Vec::with_capacity(x.len() / h);
    for (o, r) in out.chunks_mut(h).zip(x.chunks(h)) {
        rms_norm(r, w, eps, o);
        let ms = r.iter().map(|v| v * v).sum::<f32>() / h as f32;
        inv.push(1.0 / (ms + eps).sqrt());
    }
    (out, inv)
}

/// `dx += ∂(rms(x)·w)/∂x · dy` row by row:
/// `inv·w·dy − x·inv³·mean(w·dy·x)`.
fn norm_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = w.len();
    for (((xr, dyr), dxr), &iv) in x.chunks(h).zip(dy.chunks(h)).zip(dx.chunks_mut(h)).zip(inv) {
        let dot: f32 = xr.iter().zip(dyr).zip(w).map(|((a, b), c)| a * b * c).sum();
        let k = iv * iv * iv * dot / h as f32;
        for (((o, xv), dv), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *o += iv * wv * dv - xv * k;
        }
    }
}

/// Every backward op against central finite differences of an f64 re-implementation of its
/// forward op (small shapes; the analytic gradients are f32, hence the 1e-4 tolerances).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Phi3Config;
    use crate::train::lora::{LoraSettings, TargetModules};
    use crate::weights::Checkpoint;
    use rand::{RngExt, SeedableRng};

    fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-scale..scale)).collect()
    }

    /// `max |a − b| / max |b|`.
    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let m = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / m
    }

    /// Central differences of `f` at `x` for the coordinates `at`.
    fn fd(x: &[f64], at: &[usize], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-6;
        at.iter()
            .map(|&i| {
                let (mut p, mut m) = (x.to_vec(), x.to_vec());
                p[i] += h;
                m[i] -= h;
                (f(&p) - f(&m)) / (2.0 * h)
            })
            .collect()
    }

    /// The f32 gradient pass the finite-difference tests check (no bf16 head copy).
    fn exact_pass<'a>(
        model: &'a Phi3ForCausalLM,
        lora: &'a LoraParams,
        table: RopeTable,
        dropout: Option<Dropout>,
    ) -> Pass<'a> {
        Pass {
            model,
            lora,
            table,
            dropout,
            head_t: None,
        }
    }

    fn wide(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn rms64(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
        let h = w.len();
        let mut out = Vec::with_capacity(x.len());
        for r in x.chunks(h) {
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
            out.extend(r.iter().zip(w).map(|(v, &g)| v * inv * g as f64));
        }
        out
    }

    fn dot(a: &[f64], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
    }

    fn tiny() -> Phi3ForCausalLM {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-phi4");
        let cfg = Phi3Config::from_file(&dir.join("config.json")).unwrap();
        Phi3ForCausalLM::load(cfg, &Checkpoint::open_dir(&dir).unwrap()).unwrap()
    }

    fn all_targets(model: &Phi3ForCausalLM) -> LoraParams {
        let mut p = LoraParams::zeros(
            model,
            LoraSettings {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                use_rslora: false,
                targets: TargetModules::Names(vec!["down_proj".into(), "qkv_proj".into()]),
            },
        )
        .unwrap();
        p.values = rand_vec(p.len(), 5, 0.2);
        p
    }

    #[test]
    fn rms_norm_backward() {
        let (h, n) = (8, 3);
        let (x, w, dy) = (
            rand_vec(n * h, 1, 2.0),
            rand_vec(h, 2, 1.5),
            rand_vec(n * h, 3, 1.0),
        );
        let (_, inv) = norm_rows(&x, &w, 1e-5);
        let mut dx = vec![0f32; n * h];
        norm_backward(&x, &w, &inv, &dy, &mut dx);
        let at: Vec<usize> = (0..n * h).collect();
        let want = fd(&wide(&x), &at, &|x| dot(&rms64(x, &w, 1e-5), &dy));
        assert!(rel(&wide(&dx), &want) < 1e-4, "{}", rel(&wide(&dx), &want));
    }

    #[test]
    fn silu_mul_backward_matches() {
        let (i, n) = (6, 2);
        let (gu, da) = (rand_vec(n * 2 * i, 4, 3.0), rand_vec(n * i, 5, 1.0));
        let mut dgu = vec![0f32; n * 2 * i];
        silu_mul_backward(&gu, &da, &mut dgu, i);
        let f = |gu: &[f64]| -> f64 {
            let mut s = 0.0;
            for (r, d) in gu.chunks(2 * i).zip(da.chunks(i)) {
                for k in 0..i {
                    let g = r[k];
                    s += g / (1.0 + (-g).exp()) * r[i + k] * d[k] as f64;
                }
            }
            s
        };
        let at: Vec<usize> = (0..gu.len()).collect();
        let want = fd(&wide(&gu), &at, &f);
        assert!(rel(&wide(&dgu), &want) < 1e-4);
    }

    /// The gradient pass's rotation is the adjoint of the forward's: <R·x, y> = <x, Rᵀ·y>.
    #[test]
    fn rotary_transpose_is_the_adjoint() {
        let model = tiny();
        let lora = all_targets(&model);
        for table in [RopeTable::Short, RopeTable::Long] {
            let pass = exact_pass(&model, &lora, table, None);
            let n = 9;
            let rot = pass.rotary(n);
            let w = model.config.qkv_dim();
            let (x, y) = (rand_vec(n * w, 6, 1.0), rand_vec(n * w, 7, 1.0));
            let (mut rx, mut ty) = (x.clone(), y.clone());
            pass.rotate(&mut rx, &rot, false);
            pass.rotate(&mut ty, &rot, true);
            let a: f64 = rx.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            let b: f64 = x.iter().zip(&ty).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (a - b).abs() < 1e-4 * a.abs().max(1.0),
                "{table:?}: {a} vs {b}"
            );
            assert!(rx != x, "the rotation did something");
        }
    }

    /// Causal GQA attention over 70 rows (two query blocks).
    #[test]
    fn attention_backward() {
        let model = tiny();
        let lora = all_targets(&model);
        let pass = exact_pass(&model, &lora, RopeTable::Short, None);
        let cfg = &model.config;
        let (nh, nkv, hd, w) = (
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
            cfg.qkv_dim(),
        );
        let n = 70;
        let qkv = rand_vec(n * w, 8, 1.5);
        let o = pass.attention(&qkv, n);
        let d_o = rand_vec(o.len(), 9, 1.0);
        let got = pass.attention_backward(&qkv, &o, &d_o, n);
        let attn64 = |qkv: &[f64]| -> f64 {
            let mut s = 0.0;
            for h in 0..nh {
                let g = h / (nh / nkv);
                for t in 0..n {
                    let q = &qkv[t * w + h * hd..][..hd];
                    let sc: Vec<f64> = (0..=t)
                        .map(|u| {
                            let k = &qkv[u * w + (nh + g) * hd..][..hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                    for c in 0..hd {
                        let ov: f64 = (0..=t)
                            .map(|u| (sc[u] - m).exp() / z * qkv[u * w + (nh + nkv + g) * hd + c])
                            .sum();
                        s += ov * d_o[t * nh * hd + h * hd + c] as f64;
                    }
                }
            }
            s
        };
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let at: Vec<usize> = (0..200).map(|_| r.random_range(0..n * w)).collect();
        let want = fd(&wide(&qkv), &at, &attn64);
        let got: Vec<f64> = at.iter().map(|&i| got[i] as f64).collect();
        assert!(rel(&got, &want) < 1e-4, "{}", rel(&got, &want));
    }

    /// A LoRA projection with dropout: gradients at x, A and B.
    #[test]
    fn lora_projection_backward() {
        let model = tiny();
        let lora = all_targets(&model);
        let drop = Dropout { p: 0.3, seed: 77 };
        let pass = exact_pass(&model, &lora, RopeTable::Short, Some(drop));
        let p = pass.proj(1, 3);
        let (idx, m) = p.module.unwrap();
        let n = 3;
        let x = rand_vec(n * m.din, 11, 1.0);
        let dy = rand_vec(n * m.dout, 12, 1.0);
        let mut dx = vec![0f32; x.len()];
        let mut grads = vec![0f32; lora.len()];
        pass.proj_backward(&p, &x, &dy, &mut dx, &mut grads);
        let w = p.lin.weight().to_f32_vec();
        let (r, s) = (lora.settings.r, lora.settings.scale() as f64);
        let keep: Vec<f64> = (0..x.len())
            .map(|i| if drop.keep(idx, i) { 1.0 / 0.7 } else { 0.0 })
            .collect();
        // y = W·x + s·B·(A·drop(x)); the loss is <dy, y>.
        let f = |x: &[f64], a: &[f64], b: &[f64]| -> f64 {
            let mut loss = 0.0;
            for t in 0..n {
                let xr = &x[t * m.din..(t + 1) * m.din];
                let xd: Vec<f64> = xr
                    .iter()
                    .zip(&keep[t * m.din..])
                    .map(|(v, k)| v * k)
                    .collect();
                let ax: Vec<f64> = (0..r)
                    .map(|k| (0..m.din).map(|c| a[k * m.din + c] * xd[c]).sum())
                    .collect();
                for o in 0..m.dout {
                    let base: f64 = (0..m.din).map(|c| w[o * m.din + c] as f64 * xr[c]).sum();
                    let delta: f64 = (0..r).map(|k| b[o * r + k] * ax[k]).sum();
                    loss += (base + s * delta) * dy[t * m.dout + o] as f64;
                }
            }
            loss
        };
        let (x64, a64, b64) = (
            wide(&x),
            wide(&lora.values[m.a.clone()]),
            wide(&lora.values[m.b.clone()]),
        );
        let all = |len: usize| (0..len).step_by(7).collect::<Vec<_>>();
        let want = fd(&x64, &all(x.len()), &|v| f(v, &a64, &b64));
        let got: Vec<f64> = all(x.len()).iter().map(|&i| dx[i] as f64).collect();
        assert!(rel(&got, &want) < 1e-4, "dx {}", rel(&got, &want));
        let want = fd(&a64, &all(a64.len()), &|v| f(&x64, v, &b64));
        let got: Vec<f64> = all(a64.len())
            .iter()
            .map(|&i| grads[m.a.start + i] as f64)
            .collect();
        assert!(rel(&got, &want) < 1e-4, "dA {}", rel(&got, &want));
        let want = fd(&b64, &all(b64.len()), &|v| f(&x64, &a64, v));
        let got: Vec<f64> = all(b64.len())
            .iter()
            .map(|&i| grads[m.b.start + i] as f64)
            .collect();
        assert!(rel(&got, &want) < 1e-4, "dB {}", rel(&got, &want));
    }

    /// Final norm, tied LM head and cross-entropy over the labelled positions.
    #[test]
    fn head_backward() {
        let model = tiny();
        let lora = all_targets(&model);
        let pass = exact_pass(&model, &lora, RopeTable::Short, None);
        let (h, v) = (model.config.hidden_size, model.config.vocab_size);
        let n = 6;
        let x = rand_vec(n * h, 13, 1.0);
        let labels = [IGNORE, 5, IGNORE, 300, 7, 499];
        let mut dx = vec![0f32; x.len()];
        let (loss, count) = pass.head(&x, &labels, 3.0, &mut dx).unwrap();
        assert_eq!(count, 4);
        let e = model.model.embed_tokens.to_f32_vec();
        let f = |x: &[f64]| -> f64 {
            let normed = rms64(x, &model.model.norm, model.config.rms_norm_eps);
            let mut s = 0.0;
            for t in 0..n - 1 {
                if labels[t + 1] == IGNORE {
                    continue;
                }
                let row = &normed[t * h..(t + 1) * h];
                let logits: Vec<f64> = (0..v).map(|k| dot(row, &e[k * h..(k + 1) * h])).collect();
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
                s += lse - logits[labels[t + 1] as usize];
            }
            s / 3.0
        };
        assert!((loss - f(&wide(&x))).abs() < 1e-5 * loss.abs());
        let at: Vec<usize> = (0..n * h).step_by(3).collect();
        let want = fd(&wide(&x), &at, &f);
        let got: Vec<f64> = at.iter().map(|&i| dx[i] as f64).collect();
        assert!(rel(&got, &want) < 1e-4, "{}", rel(&got, &want));
        // The last row has no next token: no gradient.
        assert!(dx[(n - 1) * h..].iter().all(|&g| g == 0.0));
    }
}
