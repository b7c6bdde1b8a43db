//! The run's curves as PNG images at the end (`images/train_loss.png`, `images/eval_loss.png`,
//! `images/train_grad_norm.png`, `images/train_learning_rate.png`, as ms-swift names them): a
//! line over the logged steps, with the first and last step and the lowest and highest value
//! written at the axes. Drawn with the `image` crate already used for pictures; the numbers use
//! a 3×5 pixel digit font, so no font file is needed.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

const W: u32 = 640;
const H: u32 = 400;
const LEFT: u32 = 90;
const RIGHT: u32 = 20;
const TOP: u32 = 20;
const BOTTOM: u32 = 40;
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const LINE: Rgb<u8> = Rgb([31, 119, 180]);

/// 3×5 glyphs, rows top to bottom, 3 bits each (left bit first).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => return None,
    })
}

/// Writes `text` with its top-left corner at (x, y), each font pixel `scale` pixels wide.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, scale: u32) {
    for (i, c) in s.chars().enumerate() {
        let Some(g) = glyph(c) else { continue };
        for (r, bits) in g.iter().enumerate() {
            for b in 0..3 {
                if bits >> (2 - b) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = x + (i as u32 * 4 + b) * scale + dx;
                            let py = y + r as u32 * scale + dy;
                            if px < W && py < H {
                                img.put_pixel(px, py, INK);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for k in 0..=steps {
        let t = k as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if (0..W as i64).contains(&px) && (0..H as i64).contains(&py) {
                img.put_pixel(px as u32, py as u32, color);
            }
        }
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// A line chart of `(step, value)` points (in step order) as a PNG at `path`.
pub fn write_curve(path: &Path, points: &[(f64, f64)]) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    line(
        &mut img,
        (LEFT as f64, TOP as f64),
        (LEFT as f64, (H - BOTTOM) as f64),
        INK,
    );
    line(
        &mut img,
        (LEFT as f64, (H - BOTTOM) as f64),
        ((W - RIGHT) as f64, (H - BOTTOM) as f64),
        INK,
    );
    let finite: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if let (Some(first), Some(last)) = (finite.first(), finite.last()) {
        let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span_y = if hi > lo { hi - lo } else { 1.0 };
        let span_x = if last.0 > first.0 {
            last.0 - first.0
        } else {
            1.0
        };
        let at = |(s, v): (f64, f64)| {
            (
                LEFT as f64 + (s - first.0) / span_x * pw,
                TOP as f64 + (hi - v) / span_y * ph,
            )
        };
        for w in finite.windows(2) {
            line(&mut img, at(w[0]), at(w[1]), LINE);
        }
        if finite.len() == 1 {
            line(&mut img, at(*first), at(*first), LINE);
        }
        text(&mut img, 4, TOP, &label(hi), 2);
        text(&mut img, 4, H - BOTTOM - 10, &label(lo), 2);
        text(&mut img, LEFT, H - BOTTOM + 8, &format!("{}", first.0), 2);
        let last_label = format!("{}", last.0);
        text(
            &mut img,
            W - RIGHT - 8 * last_label.len() as u32,
            H - BOTTOM + 8,
            &last_label,
            2,
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// The curves of a run's log lines (`logging.jsonl` objects) into `dir/images/`.
pub fn write_run_curves(
    dir: &Path,
    history: &[serde_json::Value],
) -> Result<Vec<std::path::PathBuf>> {
    let step = |v: &serde_json::Value| -> Option<f64> {
        if let Some(s) = v.get("global_step").and_then(serde_json::Value::as_f64) {
            return Some(s);
        }
        v.get("global_step/max_steps")?
            .as_str()?
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    let mut written = Vec::new();
    for (key, file) in [
        ("loss", "train_loss.png"),
        ("eval_loss", "eval_loss.png"),
        ("grad_norm", "train_grad_norm.png"),
        ("learning_rate", "train_learning_rate.png"),
    ] {
        let points: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|v| Some((step(v)?, v.get(key)?.as_f64()?)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let path = dir.join("images").join(file);
        write_curve(&path, &points)?;
        written.push(path);
    }
    Ok(written)
}
