//! Media in, model inputs out: image decoding and Phi-4-multimodal's image processor, audio
//! decoding, resampling and the speech features. Sits beside `text`: it knows the processors'
//! arithmetic, not the model.

pub mod audio;
pub mod dynamic_hd;
pub mod image;
pub mod log_mel;

pub use self::audio::Waveform;
pub use self::dynamic_hd::{preprocess, CropLayout, ProcessedImage};
pub use self::image::RgbImage;
pub use self::log_mel::LogMel;
