//! Image files to RGB pixels, as the reference sees them.
//!
//! PNG, JPEG (with its EXIF orientation applied), WebP, GIF (the first frame) and BMP are decoded
//! by the `image` crate. transformers' processor converts with `convert_to_rgb`: an image with an
//! alpha channel (RGBA, LA, a palette with transparency) is composited onto white with PIL's
//! integer `alpha_composite`, everything else is converted to RGB. We do the same, bit for bit.

use std::io::Cursor;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// Interleaved 8-bit RGB, row-major: `data[(y * width + x) * 3 + c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            bail!("image has no pixels ({width}x{height})");
        }
        if data.len() != width * height * 3 {
            bail!(
                "RGB data of {} bytes does not hold a {width}x{height} image",
                data.len()
            );
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Largest image accepted by default, in pixels (a 12000 x 10000 photo; 2688 x 2688 is the
/// largest canvas the model ever sees).
pub const DEFAULT_MAX_PIXELS: u64 = 120_000_000;

/// The formats [`decode`] reads, by the names users know.
pub const SUPPORTED: &str = "PNG, JPEG, WebP, GIF, BMP";

/// Decodes an image file's bytes. Refuses unknown formats, corrupt or truncated data and images
/// of more than `max_pixels` pixels (checked from the header, before any pixel is decoded).
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("the image is empty (0 bytes)");
    }
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| {
            matches!(
                f,
                ImageFormat::Png
                    | ImageFormat::Jpeg
                    | ImageFormat::WebP
                    | ImageFormat::Gif
                    | ImageFormat::Bmp
            )
        })
        .with_context(|| format!("unsupported image format (supported: {SUPPORTED})"))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    // Decoders allocate up to this much; 8 bytes a pixel covers 16-bit RGBA.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("corrupt {format:?} image"))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        bail!("image has no pixels ({w}x{h})");
    }
    if u64::from(w) * u64::from(h) > max_pixels {
        bail!("image of {w}x{h} pixels is larger than the limit of {max_pixels} pixels");
    }
    let orientation = decoder
        .orientation()
        .with_context(|| format!("corrupt {format:?} image (orientation)"))?;
    let mut img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("corrupt or truncated {format:?} image"))?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// Reads and decodes an image file.
pub fn open(path: &std::path::Path, max_pixels: u64) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&bytes, max_pixels).with_context(|| format!("decoding {}", path.display()))
}

/// transformers' `convert_to_rgb`: alpha composited onto opaque white, then RGB.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for p in rgba.pixels() {
            let a = u32::from(p[3]);
            for &c in &p.0[..3] {
                out.push(over_white(u32::from(c), a));
            }
        }
        out
    } else {
        img.into_rgb8().into_raw()
    };
    RgbImage {
        width,
        height,
        data,
    }
}

/// One channel of PIL's `alpha_composite(white, src)` (Imaging `AlphaComposite`, 7 precision
/// bits, division by 255 as two shifts); with an opaque white backdrop its coefficients reduce to
/// `a·128` and `(255−a)·128`.
fn over_white(c: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, Rgba};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn pattern(w: u32, h: u32) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
        ImageBuffer::from_fn(w, h, |x, y| {
            Rgb([(x * 13 + y) as u8, (y * 7) as u8, (x ^ y) as u8])
        })
    }

    #[test]
    fn lossless_formats_decode_to_the_same_pixels() {
        let img = DynamicImage::ImageRgb8(pattern(37, 21));
        for f in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::WebP] {
            let got = decode(&encode(&img, f), DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!((got.width, got.height), (37, 21), "{f:?}");
            assert_eq!(got.data, img.to_rgb8().into_raw(), "{f:?}");
        }
        // JPEG is lossy: the size and roughly the values.
        let got = decode(&encode(&img, ImageFormat::Jpeg), DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((got.width, got.height), (37, 21));
    }

    #[test]
    fn transparency_is_composited_onto_white() {
        let rgba = ImageBuffer::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgba([10u8, 10, 10, 200])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let got = decode(
            &encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png),
            100,
        )
        .unwrap();
        assert_eq!(got.data, [63, 63, 63, 255, 255, 255]);
        let la = ImageBuffer::from_fn(1, 1, |_, _| image::LumaA([77u8, 77]));
        let got = decode(
            &encode(&DynamicImage::ImageLumaA8(la), ImageFormat::Png),
            100,
        )
        .unwrap();
        assert_eq!(got.data, [201, 201, 201]);
    }

    #[test]
    fn gif_gives_its_first_frame() {
        use image::codecs::gif::GifEncoder;
        use image::{Delay, Frame};
        let frame = |v: u8| {
            Frame::from_parts(
                ImageBuffer::from_pixel(4, 3, Rgba([v, v, v, 255])),
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            )
        };
        let mut out = Vec::new();
        GifEncoder::new(&mut out)
            .encode_frames([frame(255), frame(0)])
            .unwrap();
        let got = decode(&out, 100).unwrap();
        assert_eq!((got.width, got.height), (4, 3));
        assert!(got.data.iter().all(|&v| v == 255));
    }

    #[test]
    fn jpeg_exif_orientation_is_applied() {
        // 16×8, left half black, right half white; EXIF orientation 6 ("rotate 90° clockwise").
        let img = ImageBuffer::from_fn(16, 8, |x, _| Rgb([if x < 8 { 0u8 } else { 255 }; 3]));
        let jpeg = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg);
        let mut tiff = b"Exif\0\0II*\0\x08\0\0\0\x01\0".to_vec();
        tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend(((tiff.len() + 2) as u16).to_be_bytes());
        app1.extend(tiff);
        let mut with_exif = jpeg[..2].to_vec();
        with_exif.extend(app1);
        with_exif.extend(&jpeg[2..]);
        let got = decode(&with_exif, 1000).unwrap();
        assert_eq!((got.width, got.height), (8, 16), "orientation not applied");
        // The stored left (black) half is now on top.
        assert!(got.data[0] < 40 && got.data[(15 * 8) * 3] > 215);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let png = encode(&DynamicImage::ImageRgb8(pattern(40, 30)), ImageFormat::Png);
        let err = |b: &[u8], max: u64| format!("{:#}", decode(b, max).unwrap_err());
        assert!(err(&[], 100).contains("empty"));
        assert!(err(b"%PDF-1.7 not an image", 100).contains("unsupported image format"));
        assert!(err(&png[..png.len() / 2], 10_000).contains("corrupt"));
        assert!(err(&png, 1000).contains("larger than the limit of 1000 pixels"));
    }

    #[test]
    fn compositing_matches_pils_integer_formula() {
        // Values from PIL 13: Image.alpha_composite(white, (c, c, c, a)).getpixel((0, 0))[0].
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 128), 127);
        assert_eq!(over_white(100, 1), 254);
        assert_eq!(over_white(10, 200), 63);
        assert_eq!(over_white(77, 77), 201);
        assert_eq!(over_white(255, 3), 255);
        assert_eq!(over_white(3, 254), 4);
    }
}
