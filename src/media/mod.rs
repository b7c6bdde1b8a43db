//! Media in, model inputs out: image decoding and Phi-4-multimodal's image processor (audio
//! joins here in part 2). Sits beside `text`: it knows the processors' arithmetic, not the model.

pub mod dynamic_hd;
pub mod image;

pub use self::dynamic_hd::{preprocess, CropLayout, ProcessedImage};
pub use self::image::RgbImage;
