//! Calibration for `phi4 quantize --calibration`: the float model runs over a text while every
//! projection and the LM head record the mean square of each input column, which then weighs
//! each weight column's rounding error (the role of llama.cpp's importance matrix, computed by
//! the engine itself).

use anyhow::{bail, Result};

use super::Engine;
use crate::model::quantize::Importance;
use crate::model::{BatchItem, Logits};

impl Engine {
    /// Column importances from up to `max_windows` non-overlapping windows of `ctx` tokens of
    /// `ids`, each run from an empty cache (every position through the LM head too), and the
    /// tokens they covered. `progress(done, total)` is told after each window.
    pub fn calibrate(
        &mut self,
        ids: &[u32],
        ctx: usize,
        max_windows: usize,
        progress: &dyn Fn(usize, usize),
    ) -> Result<(Importance, u64)> {
        if ctx < 2 || ctx > self.max_model_len {
            bail!(
                "calibration windows of {ctx} tokens: choose 2 to {} (the model's context)",
                self.max_model_len
            );
        }
        let windows = (ids.len() / ctx).min(max_windows);
        if windows == 0 {
            bail!(
                "the calibration text has {} tokens; a window of {ctx} needs at least that many",
                ids.len()
            );
        }
        if !self.model.lm_head.weight().dtype.is_float() {
            bail!("calibration needs the float model: the weights are already quantized");
        }
        self.model.collect_stats();
        let table = self.table_for(ctx);
        let mut logits = Vec::new();
        let mut run = || -> Result<()> {
            for (i, window) in ids.chunks_exact(ctx).take(windows).enumerate() {
                let mut cache = self.model.new_cache();
                let item = BatchItem::new(window, &mut cache, table);
                self.model
                    .forward_item(item, Logits::All, None, &mut logits)?;
                progress(i + 1, windows);
            }
            Ok(())
        };
        let ran = run();
        // Collectors come off whatever happened, so the model computes as before.
        let (imp, rows) = self.model.take_importance();
        ran?;
        Ok((imp, rows))
    }
}
