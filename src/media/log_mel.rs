//! Phi-4-multimodal's speech features: 80 log-mel energies per 10 ms frame of 16 kHz audio, as
//! transformers 5.25's `Phi4MultimodalFeatureExtractor` computes them (spec §3.5), bit for bit where
//! the arithmetic allows: frames, pre-emphasis and the ×32768 scaling in f32; the Hamming window and
//! the FFT in f64 (the reference's window is f64, which promotes the product); the spectrum rounded
//! to complex64, then magnitude, power, the mel product, the floor at 1 and `ln` in f32. An
//! all-f32 FFT would differ by ~2e-4 (measured by the spec's authors), so the f64 step is kept.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

pub const WIN_LENGTH: usize = 400;
pub const HOP_LENGTH: usize = 160;
pub const N_FFT: usize = 512;
pub const N_BINS: usize = N_FFT / 2 + 1;
pub const N_MELS: usize = 80;
pub const PREEMPHASIS: f32 = 0.97;
const MEL_MAX_HZ: f64 = 7690.0;
/// Encoder time reduction: one audio token per 8 feature frames.
pub const COMPRESSION_RATE: usize = 8;

/// Feature frames for `n` samples: no padding, a trailing part frame is dropped.
pub fn num_frames(n: usize) -> usize {
    if n < WIN_LENGTH {
        0
    } else {
        (n - WIN_LENGTH) / HOP_LENGTH + 1
    }
}

/// Audio tokens (prompt positions) for `n` 16 kHz samples: `ceil(frames / 8)`.
pub fn num_tokens(n: usize) -> usize {
    num_frames(n).div_ceil(COMPRESSION_RATE)
}

fn hz_to_mel(hz: f64) -> f64 {
    1127.0 * (1.0 + hz / 700.0).ln()
}

/// transformers' `mel_filter_bank(257, 80, 0, 7690, 16000, triangularize_in_mel_space=True,
/// mel_scale="kaldi")`: triangles in mel space over 82 evenly spaced mel points, no area
/// normalisation, computed in f64 and stored as f32. Row-major `[257 bins][80 filters]`.
pub fn mel_filters() -> Vec<f32> {
    let mel_max = hz_to_mel(MEL_MAX_HZ);
    let n_points = N_MELS + 2;
    // numpy.linspace: start + i * step, the last point exactly the stop.
    let step = mel_max / (n_points - 1) as f64;
    let mut centres: Vec<f64> = (0..n_points).map(|i| i as f64 * step).collect();
    centres[n_points - 1] = mel_max;
    let bin_width = 16000.0 / ((N_BINS - 1) * 2) as f64;
    let mut out = vec![0f32; N_BINS * N_MELS];
    for k in 0..N_BINS {
        let mel = hz_to_mel(bin_width * k as f64);
        for m in 0..N_MELS {
            let down = (mel - centres[m]) / (centres[m + 1] - centres[m]);
            let up = (centres[m + 2] - mel) / (centres[m + 2] - centres[m + 1]);
            out[k * N_MELS + m] = down.min(up).max(0.0) as f32;
        }
    }
    out
}

/// The extractor: window, FFT plan and mel bank made once and shared.
pub struct LogMel {
    window: Vec<f64>,
    /// The non-zero part of each filter's column: (first bin, weights).
    filters: Vec<(usize, Vec<f32>)>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl Default for LogMel {
    fn default() -> Self {
        Self::new()
    }
}

impl LogMel {
    pub fn new() -> LogMel {
        // Symmetric Hamming (`torch.hamming_window(400, periodic=False)`, f64).
        let window = (0..WIN_LENGTH)
            .map(|i| {
                0.54 - 0.46
                    * (2.0 * std::f64::consts::PI * i as f64 / (WIN_LENGTH - 1) as f64).cos()
            })
            .collect();
        let bank = mel_filters();
        let filters = (0..N_MELS)
            .map(|m| {
                let nz: Vec<usize> = (0..N_BINS)
                    .filter(|&k| bank[k * N_MELS + m] != 0.0)
                    .collect();
                let (lo, hi) = (nz[0], nz[nz.len() - 1]);
                (lo, (lo..=hi).map(|k| bank[k * N_MELS + m]).collect())
            })
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        LogMel {
            window,
            filters,
            fft,
        }
    }

    /// Features of 16 kHz mono samples, row-major `[frames][80]`.
    pub fn features(&self, samples: &[f32]) -> Vec<f32> {
        let frames = num_frames(samples.len());
        let mut out = vec![0f32; frames * N_MELS];
        // Frames are independent: split them over the threads in blocks.
        use rayon::prelude::*;
        out.par_chunks_mut(N_MELS * 64)
            .enumerate()
            .for_each(|(block, rows)| {
                let mut input = self.fft.make_input_vec();
                let mut spectrum = self.fft.make_output_vec();
                let mut scratch = self.fft.make_scratch_vec();
                let mut power = vec![0f32; N_BINS];
                for (r, row) in rows.chunks_exact_mut(N_MELS).enumerate() {
                    let start = (block * 64 + r) * HOP_LENGTH;
                    let frame = &samples[start..start + WIN_LENGTH];
                    self.frame(
                        frame,
                        &mut input,
                        &mut spectrum,
                        &mut scratch,
                        &mut power,
                        row,
                    );
                }
            });
        out
    }

    fn frame(
        &self,
        x: &[f32],
        input: &mut [f64],
        spectrum: &mut [Complex<f64>],
        scratch: &mut [Complex<f64>],
        power: &mut [f32],
        row: &mut [f32],
    ) {
        // The reference's pre-emphasis uses x[0] as its own predecessor.
        for i in 0..WIN_LENGTH {
            let prev = x[i.saturating_sub(1)];
            let y = (x[i] - PREEMPHASIS * prev) * 32768.0;
            input[i] = self.window[i] * y as f64;
        }
        input[WIN_LENGTH..].fill(0.0);
        self.fft
            .process_with_scratch(input, spectrum, scratch)
            .expect("FFT sizes are fixed");
        for (p, c) in power.iter_mut().zip(spectrum.iter()) {
            let m = (c.re as f32).hypot(c.im as f32);
            *p = m * m;
        }
        for (m, (lo, weights)) in self.filters.iter().enumerate() {
            let mut acc = 0f32;
            for (w, p) in weights.iter().zip(&power[*lo..]) {
                acc += w * p;
            }
            row[m] = acc.max(1.0).ln();
        }
    }
}
