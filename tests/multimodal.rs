//! Phi-4-multimodal against transformers 5.25 (scripts/make_mm_fixtures.py): the image
//! processor, the vision tower, both checkpoint layouts, the LoRA routing per mode.

mod common;

use common::{max_abs_diff, pattern_image, Reference};
use phi4::media::dynamic_hd::{self, CropLayout, DEFAULT_MAX_CROPS, MASK};
use sha2::{Digest, Sha256};

fn reference() -> Reference {
    Reference::load_named("tiny-phi4mm")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn processor_matches_transformers_for_every_image_size() {
    let r = reference();
    let cases = r.meta["processor"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let img = pattern_image(w, h);
        let l = CropLayout::new(w, h, DEFAULT_MAX_CROPS).unwrap();
        let json = |k: &str| -> Vec<usize> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        };
        assert_eq!(vec![l.grid_w, l.grid_h], json("grid"), "{w}x{h} grid");
        assert_eq!(vec![l.resized_w, l.resized_h], json("resized"), "{w}x{h}");
        assert_eq!(vec![l.pad_w, l.pad_h], json("padding"), "{w}x{h}");
        assert_eq!(vec![l.canvas_h(), l.canvas_w()], json("image_sizes"));
        assert_eq!(
            l.num_tokens(),
            case["num_img_tokens"].as_u64().unwrap() as usize,
            "{w}x{h} tokens"
        );
        // The uint8 resize must be bit-exact: the ±1 rounding cases are all over this picture.
        let canvas = dynamic_hd::canvas(&img, &l);
        assert_eq!(
            hex(&Sha256::digest(&canvas)),
            case["canvas_sha256"].as_str().unwrap(),
            "{w}x{h}: resized canvas differs from torchvision's"
        );
        let p = dynamic_hd::preprocess(&img, DEFAULT_MAX_CROPS).unwrap();
        let key = format!("proc.{w}x{h}");
        let want_mask = r.tensor(&format!("{key}.mask"));
        let got_mask: Vec<f32> = p.masks.iter().map(|&m| m as f32).collect();
        assert_eq!(got_mask, want_mask, "{w}x{h} masks");
        assert_eq!(p.masks.len(), p.views() * MASK * MASK);
        // Crops are the normalised canvas exactly; the global view is bicubic in f32.
        let cw = l.canvas_w();
        let crop0 = &p.pixels[3 * 448 * 448..];
        for (y, x, c) in [(0, 0, 0), (17, 301, 1), (447, 447, 2)] {
            let want = (canvas[(y * cw + x) * 3 + c] as f32 - 127.5) / 127.5;
            assert_eq!(crop0[c * 448 * 448 + y * 448 + x], want);
        }
        let rows = r.tensor(&format!("{key}.global_rows"));
        let mut got = Vec::new();
        for c in 0..3 {
            for y in (0..448).step_by(32) {
                got.extend_from_slice(&p.pixels[c * 448 * 448 + y * 448..][..448]);
            }
        }
        let d = max_abs_diff(&got, rows);
        assert!(d < 2e-6, "{w}x{h}: global view differs by {d}");
    }
}
