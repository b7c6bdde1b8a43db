//! Element-wise and row-wise ops of the decoder. These touch activations only (kilobytes per
//! token), so plain loops that the compiler vectorises are enough; the weights' traffic is in
//! [`super::matmul`].

use super::dot::WeightElem;
use super::{cpu, Isa};

/// RMSNorm as transformers computes it: `x / sqrt(mean(x²) + eps) * w`, accumulated in f32.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// In-place softmax over a row.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `silu(gate) * up`, written into `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Rotates the first `2 * cos.len()` dims of one head in place, NeoX half-split: dim k pairs with
/// dim k + half; dims past the rotary part pass through.
pub fn rope_neox(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for k in 0..half {
        let (a, b) = (head[k], head[k + half]);
        head[k] = a * cos[k] - b * sin[k];
        head[k + half] = b * cos[k] + a * sin[k];
    }
}

/// Attention of one new token for the `q.len() / hd` query heads that share one kv head (GQA):
/// `out[g] = softmax(scale · q[g] · Kᵀ) · V` over `keys` cached positions: key and value `p` are
/// rows `p` of `hd` in `k` and `v`. `sc` is scratch for the scores.
///
/// Each key and value row is read once for the whole group. Two general matrix products did the
/// same (no faster: with three query rows their packing of K and V is most of the work); what
/// made decode at 512–640 positions 12% faster was the per-head contiguous cache ([`KvCache`]).
///
/// [`KvCache`]: crate::model::KvCache
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
    sc: &mut Vec<f32>,
) {
    let group = q.len() / hd;
    assert!(group <= 8 && q.len() == group * hd && out.len() == q.len());
    assert!(keys * hd <= k.len().min(v.len()));
    sc.clear();
    sc.resize(group * keys, 0.0);
    let mut qs: [&[f32]; 8] = [&[]; 8];
    for (slot, head) in qs.iter_mut().zip(q.chunks(hd)) {
        *slot = head;
    }
    let mut row = [0f32; 8];
    for (p, key) in k.chunks_exact(hd).take(keys).enumerate() {
        f32::dot_rows(key, &qs[..group], &mut row[..group]);
        for g in 0..group {
            sc[g * keys + p] = row[g] * scale;
        }
    }
    for r in sc.chunks_mut(keys) {
        softmax(r);
    }
    out.fill(0.0);
    match cpu() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 only after detection; the bounds were asserted above.
        Isa::Avx2 => unsafe { weighted_sum_avx2(sc, v, keys, hd, out) },
        _ => weighted_sum(sc, v, keys, hd, out),
    }
}

/// `out[g] += Σ_p sc[g][p] · v[p]`: element-wise, so plain loops vectorise.
#[inline(always)]
fn weighted_sum(sc: &[f32], v: &[f32], keys: usize, hd: usize, out: &mut [f32]) {
    for (p, vr) in v.chunks_exact(hd).take(keys).enumerate() {
        for (g, o) in out.chunks_mut(hd).enumerate() {
            let w = sc[g * keys + p];
            for (o, x) in o.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(sc: &[f32], v: &[f32], keys: usize, hd: usize, out: &mut [f32]) {
    weighted_sum(sc, v, keys, hd, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_attention_matches_the_definition() {
        let (hd, group, keys) = (24, 3, 37);
        let data = |n: usize, seed: u64| crate::kernels::test_data(n, seed);
        let q = data(group * hd, 1);
        let k = data(keys * hd, 2);
        let v = data(keys * hd, 3);
        let scale = 0.3;
        let mut out = vec![0f32; group * hd];
        attend_one(&q, &k, &v, keys, hd, scale, &mut out, &mut Vec::new());
        for g in 0..group {
            let mut s: Vec<f64> = (0..keys)
                .map(|p| {
                    (0..hd)
                        .map(|j| q[g * hd + j] as f64 * k[p * hd + j] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            s.iter_mut().for_each(|x| *x = (*x - m).exp());
            let z: f64 = s.iter().sum();
            for j in 0..hd {
                let want: f64 = (0..keys).map(|p| s[p] / z * v[p * hd + j] as f64).sum();
                assert!((out[g * hd + j] as f64 - want).abs() < 1e-5, "{g} {j}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32 + 1e-5).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_the_tail() {
        let mut h = [1.0f32, 2.0, 3.0, 4.0, 9.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        rope_neox(&mut h, &c, &s);
        // pair (0,2) rotated by 90°, pair (1,3) untouched, dim 4 passes through.
        assert_eq!(h, [-3.0, 2.0, 1.0, 4.0, 9.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0, -1e9];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
