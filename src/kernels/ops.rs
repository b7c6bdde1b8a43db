//! Element-wise and row-wise ops of the decoder. These touch activations only (kilobytes per
//! token), so plain loops that the compiler vectorises are enough; the weights' traffic is in
//! [`super::matmul`].

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

#[cfg(test)]
mod tests {
    use super::*;

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
