//! Phi-4-multimodal's image processor ("dynamic HD"), as transformers 5.25's
//! `Phi4MultimodalImageProcessor` computes it (spec §3.4, §3.10).
//!
//! An image is scaled to fill a grid of 448×448 crops (at most `dynamic_hd`, 36 in the released
//! preprocessor), padded with white on the right or bottom, and cut into crops; a 448×448 bicubic
//! "global view" of the whole canvas goes first. Patch masks mark the 14×14 patches that are
//! padding. The uint8 resize is torchvision's antialiased bilinear on a uint8 tensor, which works
//! in fixed point; it is reproduced here bit for bit (not PIL's, which differs by ±1 on a few
//! values in a thousand).

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::image::RgbImage;

/// Side of a crop and of the global view, in pixels.
pub const CROP: usize = 448;
/// Side of a vision patch, in pixels.
pub const PATCH: usize = 14;
/// Patches along a crop's side.
pub const MASK: usize = CROP / PATCH;
/// `dynamic_hd` of the released preprocessor: the most crops an image is cut into.
pub const DEFAULT_MAX_CROPS: usize = 36;

/// How an image of `width × height` is laid out on its canvas of crops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropLayout {
    pub width: usize,
    pub height: usize,
    /// Crops across and down.
    pub grid_w: usize,
    pub grid_h: usize,
    /// Size the image is resized to before padding.
    pub resized_w: usize,
    pub resized_h: usize,
    /// White columns on the right and rows at the bottom.
    pub pad_w: usize,
    pub pad_h: usize,
}

impl CropLayout {
    /// The grid for an image: `ceil(w/448) × ceil(h/448)` crops when that is at most
    /// `max_crops`, else the grid of at most `max_crops` crops whose aspect ratio is closest to
    /// the image's (ties go to the larger grid when the image has more than half its pixels).
    pub fn new(width: usize, height: usize, max_crops: usize) -> Result<CropLayout> {
        if width == 0 || height == 0 {
            bail!("image has no pixels ({width}x{height})");
        }
        if max_crops == 0 {
            bail!("the most crops per image must be at least 1");
        }
        let (wc, hc) = (width.div_ceil(CROP), height.div_ceil(CROP));
        let (grid_w, grid_h) = if wc * hc <= max_crops {
            (wc, hc)
        } else {
            // transformers sorts a set of (i, j) by i·j only, so the order within one product
            // is the set's; among same-product grids no aspect ratio is ever equally close to
            // two that are both best (checked for 36 crops), so (i·j, i) orders them the same.
            let mut cands: Vec<(usize, usize)> = (1..=max_crops)
                .flat_map(|i| (1..=max_crops / i).map(move |j| (i, j)))
                .collect();
            cands.sort_by_key(|&(i, j)| (i * j, i));
            let aspect = width as f64 / height as f64;
            let area = (width * height) as f64;
            let mut best = (1, 1);
            let mut best_diff = f64::INFINITY;
            for (i, j) in cands {
                let diff = (aspect - i as f64 / j as f64).abs();
                if diff < best_diff {
                    best_diff = diff;
                    best = (i, j);
                } else if diff == best_diff && area > 0.5 * (CROP * CROP * i * j) as f64 {
                    best = (i, j);
                }
            }
            best
        };
        let (tw, th) = (CROP * grid_w, CROP * grid_h);
        let rw = tw as f64 / width as f64;
        let rh = th as f64 / height as f64;
        let (resized_w, resized_h) = if rw < rh {
            (tw, (height as f64 * rw) as usize)
        } else {
            ((width as f64 * rh) as usize, th)
        };
        if resized_w < 10 || resized_h < 10 {
            bail!(
                "the aspect ratio of a {width}x{height} image is too extreme: it would be resized to {resized_w}x{resized_h}"
            );
        }
        Ok(CropLayout {
            width,
            height,
            grid_w,
            grid_h,
            resized_w,
            resized_h,
            pad_w: tw - resized_w,
            pad_h: th - resized_h,
        })
    }

    pub fn crops(&self) -> usize {
        self.grid_w * self.grid_h
    }

    pub fn canvas_w(&self) -> usize {
        CROP * self.grid_w
    }

    pub fn canvas_h(&self) -> usize {
        CROP * self.grid_h
    }

    /// Patch rows and columns of the canvas that hold image (a whole patch of padding is masked).
    pub fn valid_patches(&self) -> (usize, usize) {
        let masked = |pad: usize| if pad >= PATCH { pad / PATCH } else { 0 };
        (
            MASK * self.grid_h - masked(self.pad_h),
            MASK * self.grid_w - masked(self.pad_w),
        )
    }

    /// Rows and columns of 2×2-pooled features that the sub-image part of the prompt keeps.
    pub fn useful_pooled(&self) -> (usize, usize) {
        let (r, c) = self.valid_patches();
        (r.div_ceil(2), c.div_ceil(2))
    }

    /// Image tokens in the prompt: the kept sub-image features with a separator after each row,
    /// one global separator, and the 16×16 global view with a separator after each row.
    pub fn num_tokens(&self) -> usize {
        let (r, c) = self.useful_pooled();
        let g = MASK / 2;
        r * (c + 1) + 1 + g * (g + 1)
    }
}

/// An image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    pub layout: CropLayout,
    /// `[1 + crops, 3, 448, 448]`: the global view, then the crops row by row, in `[-1, 1]`.
    pub pixels: Vec<f32>,
    /// `[1 + crops, 32, 32]`: 1 where a patch holds image, 0 where it is padding.
    pub masks: Vec<u8>,
}

impl ProcessedImage {
    /// Views (global + crops).
    pub fn views(&self) -> usize {
        1 + self.layout.crops()
    }

    pub fn num_tokens(&self) -> usize {
        self.layout.num_tokens()
    }
}

/// Runs the whole processor on an image.
pub fn preprocess(img: &RgbImage, max_crops: usize) -> Result<ProcessedImage> {
    let layout = CropLayout::new(img.width, img.height, max_crops)?;
    let canvas = canvas(img, &layout);
    let (cw, ch) = (layout.canvas_w(), layout.canvas_h());
    // transformers' fused rescale + normalise: (x - 127.5) / 127.5 in f32, planes CHW.
    let mut planes = vec![0f32; 3 * ch * cw];
    for (c, plane) in planes.chunks_mut(ch * cw).enumerate() {
        for (p, v) in plane.iter_mut().enumerate() {
            *v = (f32::from(canvas[p * 3 + c]) - 127.5) / 127.5;
        }
    }
    let views = 1 + layout.crops();
    let mut pixels = vec![0f32; views * 3 * CROP * CROP];
    let (global, crops) = pixels.split_at_mut(3 * CROP * CROP);
    for (c, out) in global.chunks_mut(CROP * CROP).enumerate() {
        bicubic(
            &planes[c * ch * cw..(c + 1) * ch * cw],
            cw,
            ch,
            out,
            CROP,
            CROP,
        );
    }
    for (k, crop) in crops.chunks_mut(3 * CROP * CROP).enumerate() {
        let (gy, gx) = (k / layout.grid_w, k % layout.grid_w);
        for (c, out) in crop.chunks_mut(CROP * CROP).enumerate() {
            let plane = &planes[c * ch * cw..(c + 1) * ch * cw];
            for (y, row) in out.chunks_mut(CROP).enumerate() {
                let start = (gy * CROP + y) * cw + gx * CROP;
                row.copy_from_slice(&plane[start..start + CROP]);
            }
        }
    }
    let (valid_rows, valid_cols) = layout.valid_patches();
    let mut masks = vec![1u8; views * MASK * MASK];
    for (k, m) in masks[MASK * MASK..].chunks_mut(MASK * MASK).enumerate() {
        let (gy, gx) = (k / layout.grid_w, k % layout.grid_w);
        for (y, row) in m.chunks_mut(MASK).enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                *v = u8::from(gy * MASK + y < valid_rows && gx * MASK + x < valid_cols);
            }
        }
    }
    Ok(ProcessedImage {
        layout,
        pixels,
        masks,
    })
}

/// The resized image on its white canvas, interleaved RGB (`canvas_h × canvas_w × 3`).
pub fn canvas(img: &RgbImage, layout: &CropLayout) -> Vec<u8> {
    let resized = resize_bilinear_aa(
        &img.data,
        img.width,
        img.height,
        layout.resized_w,
        layout.resized_h,
    );
    let (cw, ch) = (layout.canvas_w(), layout.canvas_h());
    let mut out = vec![255u8; ch * cw * 3];
    for (y, row) in resized.chunks(layout.resized_w * 3).enumerate() {
        out[y * cw * 3..][..row.len()].copy_from_slice(row);
    }
    out
}

/// One axis of torchvision's antialiased resize in fixed point: for each output index the first
/// source index, how many it reads and their int16 weights (`taps` per output), at a precision
/// shared by the axis (ATen `_compute_index_ranges_int16_weights`).
struct AaAxis {
    first: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    taps: usize,
    precision: u32,
}

impl AaAxis {
    /// The triangle (bilinear) filter, widened by the scale when shrinking, as PIL defines it.
    fn bilinear(input: usize, output: usize) -> AaAxis {
        let scale = input as f64 / output as f64;
        let support = if scale >= 1.0 { scale } else { 1.0 };
        let taps = support.ceil() as usize * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let mut first = Vec::with_capacity(output);
        let mut len = Vec::with_capacity(output);
        let mut real = vec![0f64; output * taps];
        let mut wt_max = 0f64;
        for (i, w) in real.chunks_mut(taps).enumerate() {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero, as the C++ casts do.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize =
                (((center + support + 0.5) as i64).min(input as i64) - xmin).clamp(0, taps as i64);
            let mut total = 0f64;
            for (j, wj) in w[..xsize as usize].iter_mut().enumerate() {
                let x = (((j as i64 + xmin) as f64 - center + 0.5) * invscale).abs();
                *wj = if x < 1.0 { 1.0 - x } else { 0.0 };
                total += *wj;
            }
            if total != 0.0 {
                for wj in &mut w[..xsize as usize] {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            first.push(xmin as usize);
            len.push(xsize as usize);
        }
        let mut precision = 0;
        while precision < 22 {
            let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let scale_up = f64::from(1u32 << precision);
        let weights = real
            .iter()
            .map(|&w| {
                let v = w * scale_up;
                if v < 0.0 {
                    (-0.5 + v) as i32
                } else {
                    (0.5 + v) as i32
                }
            })
            .collect();
        AaAxis {
            first,
            len,
            weights,
            taps,
            precision,
        }
    }

    /// One output value from `len` source values read by `at`, rounded and clamped to u8.
    #[inline]
    fn apply(&self, i: usize, at: impl Fn(usize) -> u8) -> u8 {
        let w = &self.weights[i * self.taps..][..self.len[i]];
        let mut acc: i32 = 1 << (self.precision - 1);
        for (j, &wj) in w.iter().enumerate() {
            acc += i32::from(at(self.first[i] + j)) * wj;
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// torchvision v2's `resize` of a uint8 image, bilinear with antialias: the width pass first,
/// then the height pass, each skipped when that side does not change.
pub fn resize_bilinear_aa(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let horizontal = if ow != w {
        let ax = AaAxis::bilinear(w, ow);
        let mut out = vec![0u8; h * ow * 3];
        out.par_chunks_mut(ow * 3)
            .zip(src.par_chunks(w * 3))
            .for_each(|(o, row)| {
                for x in 0..ow {
                    for c in 0..3 {
                        o[x * 3 + c] = ax.apply(x, |i| row[i * 3 + c]);
                    }
                }
            });
        out
    } else {
        src.to_vec()
    };
    if oh == h {
        return horizontal;
    }
    let ay = AaAxis::bilinear(h, oh);
    let mut out = vec![0u8; oh * ow * 3];
    out.par_chunks_mut(ow * 3).enumerate().for_each(|(y, o)| {
        for (x, v) in o.iter_mut().enumerate() {
            *v = ay.apply(y, |i| horizontal[i * ow * 3 + x]);
        }
    });
    out
}

/// torch's `interpolate(mode="bicubic", align_corners=False)` (a = −0.75, no antialias) of one
/// f32 plane `w × h` to `ow × oh`, in its order of operations: each output sums four rows, each
/// row four columns, with clamped edge indices.
pub fn bicubic(src: &[f32], w: usize, h: usize, out: &mut [f32], ow: usize, oh: usize) {
    let taps = |input: usize, output: usize| -> Vec<([usize; 4], [f32; 4])> {
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|i| {
                let real = scale * (i as f32 + 0.5) - 0.5;
                let index = (real.floor() as i64).min(input as i64 - 1);
                let t = (real - index as f32).clamp(0.0, 1.0);
                let idx = std::array::from_fn(|j| {
                    (index - 1 + j as i64).clamp(0, input as i64 - 1) as usize
                });
                (idx, cubic_coefficients(t))
            })
            .collect()
    };
    let (xs, ys) = (taps(w, ow), taps(h, oh));
    out.par_chunks_mut(ow).zip(&ys).for_each(|(row, (yi, yw))| {
        for (v, (xi, xw)) in row.iter_mut().zip(&xs) {
            let mut acc = 0f32;
            for k in 0..4 {
                let line = &src[yi[k] * w..];
                let mut t = line[xi[0]] * xw[0];
                for j in 1..4 {
                    t += line[xi[j]] * xw[j];
                }
                acc = if k == 0 { t * yw[0] } else { acc + t * yw[k] };
            }
            *v = acc;
        }
    });
}

/// ATen's `get_cubic_upsample_coefficients` with A = −0.75.
fn cubic_coefficients(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let x2 = 1.0 - t;
    [far(t + 1.0), near(t), near(x2), far(x2 + 1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_the_spec_table() {
        // spec §3.4, every row measured with transformers 5.25's processor.
        for (w, h, tokens) in [
            (448, 448, 545),
            (100, 100, 545),
            (640, 480, 1065),
            (1344, 896, 1841),
            (1000, 666, 1841),
            (224, 896, 561),
            (1920, 1080, 3918),
            (4000, 3000, 3393),
            (3000, 400, 1968),
            (2688, 2688, 9585),
            (500, 300, 721),
        ] {
            let l = CropLayout::new(w, h, DEFAULT_MAX_CROPS).unwrap();
            assert_eq!(l.num_tokens(), tokens, "{w}x{h}: {l:?}");
        }
        let l = CropLayout::new(4000, 3000, DEFAULT_MAX_CROPS).unwrap();
        assert_eq!((l.grid_w, l.grid_h), (4, 3));
        let l = CropLayout::new(500, 300, DEFAULT_MAX_CROPS).unwrap();
        assert_eq!((l.grid_w, l.resized_w, l.pad_w), (2, 746, 150));
    }

    #[test]
    fn extreme_aspect_ratios_are_refused() {
        let e = CropLayout::new(10000, 5, DEFAULT_MAX_CROPS).unwrap_err();
        assert!(e.to_string().contains("too extreme"), "{e}");
        assert!(CropLayout::new(0, 5, 36).is_err());
    }

    #[test]
    fn same_size_resize_is_the_identity() {
        let src: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 37 % 251) as u8).collect();
        assert_eq!(resize_bilinear_aa(&src, 5, 7, 5, 7), src);
    }
}
