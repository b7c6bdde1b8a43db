//! Ops of the encoders (the SigLIP vision tower, the Conformer speech encoder): LayerNorm, the
//! two GELUs, swish, and attention in which every query sees every (valid) key, optionally with
//! a learned bias by relative position.
//!
//! Attention runs as the decoder's prefill runs it, blocked matrix products (`attend_block_scores`,
//! `attend_block_values` in `ops`):
//! 64 query rows at a time against all keys, so the scores of a job stay 64 × keys floats.

use rayon::prelude::*;

use super::ops::{attend_block_scores, attend_block_values, softmax};
use super::SharedOut;

/// LayerNorm over one row: `(x − mean) / sqrt(var + eps) · w + b`, biased variance; the
/// moments are accumulated in f64.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = (1.0 / (var + f64::from(eps)).sqrt()) as f32;
    let mean = mean as f32;
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * inv * w + b;
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`), in place, on every thread.
pub fn gelu_tanh(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(super::ops::gelu_tanh);
}

/// Exact GELU, `x · Φ(x)` through erf, in place.
pub fn gelu_erf(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Swish (SiLU), `x · sigmoid(x)`, in place.
pub fn swish(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|c| {
        for v in c {
            *v /= 1.0 + (-*v).exp();
        }
    });
}

/// A T5-style relative-position bias without buckets: `table` is `[heads][2 · max]`, and the
/// logit of query `i` for key `j` gains `table[h][clamp(j − i, −max, max − 1) + max]`.
pub struct RelativeBias<'a> {
    pub table: &'a [f32],
    pub max: usize,
}

/// Query rows per block of scores.
const QUERY_BLOCK: usize = 64;

/// Multi-head attention over groups of rows (one group: a vision crop), every query of a group
/// seeing every key of that group that `valid` allows (a key-padding mask).
///
/// `q`, `k`, `v` and `out` are `[groups · n, heads · hd]` row-major; `valid` is `[groups · n]`
/// (empty: all keys valid). A group with no valid key attends uniformly to all of them, as the
/// reference's additive mask of the dtype's minimum then does. `bias` adds a relative-position
/// bias to the scaled logits (positions counted inside the group).
#[allow(clippy::too_many_arguments)]
pub fn attention_full(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    valid: &[bool],
    groups: usize,
    n: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    bias: Option<&RelativeBias>,
    out: &mut [f32],
) {
    let width = heads * hd;
    assert_eq!(q.len(), groups * n * width);
    assert_eq!(out.len(), q.len());
    assert!(valid.is_empty() || valid.len() == groups * n);
    let blocks = n.div_ceil(QUERY_BLOCK);
    let shared = SharedOut::new(out);
    (0..groups * heads * blocks)
        .into_par_iter()
        .for_each(|job| {
            let (g, rest) = (job / (heads * blocks), job % (heads * blocks));
            let (head, b) = (rest / blocks, rest % blocks);
            let (q0, q1) = (b * QUERY_BLOCK, ((b + 1) * QUERY_BLOCK).min(n));
            let rows = g * n..(g + 1) * n;
            let mut keys: Vec<usize> = rows
                .clone()
                .filter(|&r| valid.is_empty() || valid[r])
                .collect();
            if keys.is_empty() {
                keys = rows.collect();
            }
            let m = keys.len();
            // The group's valid keys and values of this head, packed.
            let (mut kp, mut vp) = (vec![0f32; m * hd], vec![0f32; m * hd]);
            for (i, &r) in keys.iter().enumerate() {
                let at = r * width + head * hd;
                kp[i * hd..(i + 1) * hd].copy_from_slice(&k[at..at + hd]);
                vp[i * hd..(i + 1) * hd].copy_from_slice(&v[at..at + hd]);
            }
            let mut sc = vec![0f32; (q1 - q0) * m];
            // SAFETY: pointers and strides stay inside q (rows g·n+q0..g·n+q1, this head's
            // columns), kp (m rows of hd) and sc ((q1-q0) rows of m).
            unsafe {
                attend_block_scores(
                    q1 - q0,
                    m,
                    hd,
                    q.as_ptr().add((g * n + q0) * width + head * hd),
                    width,
                    kp.as_ptr(),
                    scale,
                    sc.as_mut_ptr(),
                    m,
                );
            }
            if let Some(b) = bias {
                let max = b.max as isize;
                let table = &b.table[head * 2 * b.max..(head + 1) * 2 * b.max];
                for (i, row) in (q0..q1).zip(sc.chunks_mut(m)) {
                    for (s, &r) in row.iter_mut().zip(&keys) {
                        let d = (r - g * n) as isize - i as isize;
                        *s += table[(d.clamp(-max, max - 1) + max) as usize];
                    }
                }
            }
            for row in sc.chunks_mut(m) {
                softmax(row);
            }
            let o = shared;
            // SAFETY: each job writes its own block: rows g·n+q0..g·n+q1, columns of its head.
            unsafe {
                attend_block_values(
                    q1 - q0,
                    m,
                    hd,
                    sc.as_ptr(),
                    m,
                    vp.as_ptr(),
                    o.get().add((g * n + q0) * width + head * hd),
                    width,
                    false,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data;

    #[test]
    fn full_attention_matches_the_definition_with_masked_keys() {
        let (groups, n, heads, hd) = (2, 70, 3, 8);
        let w = heads * hd;
        let q = test_data(groups * n * w, 1);
        let k = test_data(groups * n * w, 2);
        let v = test_data(groups * n * w, 3);
        // Group 0: the last 9 keys padding; group 1 all valid.
        let valid: Vec<bool> = (0..groups * n).map(|r| r >= n || r % n < n - 9).collect();
        let scale = 0.37;
        let mut out = vec![0f32; q.len()];
        attention_full(
            &q, &k, &v, &valid, groups, n, heads, hd, scale, None, &mut out,
        );
        for g in 0..groups {
            for h in 0..heads {
                for i in 0..n {
                    let qi = &q[(g * n + i) * w + h * hd..][..hd];
                    let mut s: Vec<f64> = (0..n)
                        .map(|j| {
                            let kj = &k[(g * n + j) * w + h * hd..][..hd];
                            let d: f64 = qi.iter().zip(kj).map(|(a, b)| f64::from(a * b)).sum();
                            if valid[g * n + j] {
                                d * f64::from(scale)
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                    let tot: f64 = s
                        .iter_mut()
                        .map(|x| {
                            *x = (*x - mx).exp();
                            *x
                        })
                        .sum();
                    for c in 0..hd {
                        let want: f64 = (0..n)
                            .map(|j| s[j] / tot * f64::from(v[(g * n + j) * w + h * hd + c]))
                            .sum();
                        let got = out[(g * n + i) * w + h * hd + c];
                        assert!(
                            (f64::from(got) - want).abs() < 1e-5,
                            "g{g} h{h} i{i} c{c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn layer_norm_and_gelus_match_their_definitions() {
        let x = [1.0f32, -2.0, 0.5, 3.0];
        let mut o = [0f32; 4];
        layer_norm(&x, &[1.0; 4], &[0.5; 4], 1e-6, &mut o);
        let mean = 0.625f64;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / 4.0;
        for (o, &v) in o.iter().zip(&x) {
            let want = (f64::from(v) - mean) / (var + 1e-6).sqrt() + 0.5;
            assert!((f64::from(*o) - want).abs() < 1e-6);
        }
        // torch.nn.functional.gelu(torch.tensor([-1.5, 0.3, 2.0]), approximate=...) in f32
        let mut t = [-1.5f32, 0.3, 2.0];
        gelu_tanh(&mut t);
        for (g, w) in t.iter().zip([-0.100_428_43f32, 0.185_370_94, 1.954_597_7]) {
            assert!((g - w).abs() < 4e-7, "{g} vs {w}");
        }
        // Every vector width against the tanh definition in f64, tails and extremes included.
        let xs: Vec<f32> = (0..40_000)
            .map(|i| (i as f32 - 20_000.0) * 7.3e-4)
            .chain([-90.0, 90.0, 0.0])
            .collect();
        for n in [1, 7, 8, 15, 16, 17, xs.len()] {
            let mut y = xs[..n].to_vec();
            gelu_tanh(&mut y);
            for (&x, &y) in xs.iter().zip(&y) {
                let x = f64::from(x);
                let want =
                    0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh());
                assert!(
                    (f64::from(y) - want).abs() <= 3e-6 * want.abs() + 1e-9,
                    "gelu({x}) = {y}, want {want}"
                );
            }
        }
        let mut e = [-1.5f32, 0.3, 2.0];
        gelu_erf(&mut e);
        for (g, w) in e.iter().zip([-0.100_210_86f32, 0.185_373_44, 1.954_499_7]) {
            assert!((g - w).abs() < 2e-7, "{g} vs {w}");
        }
    }
}
