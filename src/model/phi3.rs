//! The Phi-3-architecture decoder that Phi-4-mini (and the language model of Phi-4-multimodal)
//! uses. Struct paths mirror the Hugging Face tensor names: `model.layers.{i}.self_attn.qkv_proj`
//! is `Phi3ForCausalLM.model.layers[i].self_attn.qkv_proj`.
//!
//! Reference semantics (spec §1.4): fused qkv rows Q|K|V, GQA (query head h reads kv head
//! h / group), NeoX rotary on the first `rotary_dim` dims of q and k only, causal softmax
//! attention scaled by 1/sqrt(head_dim), fused gate|up with SiLU, tied LM head. Activations are
//! f32 throughout, whatever the weights' dtype.

use std::cell::RefCell;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::kv_cache::{KvCache, KvType};
use super::linear::{AdapterId, Linear};
use super::quantize::{Importance, Recipe};
use super::rope::{Rope, RopeTable};
use crate::config::Phi3Config;
use crate::kernels::bf16::Bf16Acts;
use crate::kernels::ops::{
    attend_block_scores, attend_block_values, attend_one, pages, rms_norm, rope_neox, silu_mul,
    softmax, AttnScratch,
};
use crate::kernels::wide_acts::QuantActs;
use crate::kernels::SharedOut;
use crate::weights::{check_registry, Checkpoint, Expected, Tensor};

pub struct Attention {
    pub qkv_proj: Linear,
    pub o_proj: Linear,
}

pub struct Mlp {
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
}

pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer's projections, each with its name under `model.layers.{i}`.
    pub fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("self_attn.qkv_proj", &self.self_attn.qkv_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_up_proj", &self.mlp.gate_up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    /// [`DecoderLayer::linears`], mutable.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("self_attn.qkv_proj", &mut self.self_attn.qkv_proj),
            ("self_attn.o_proj", &mut self.self_attn.o_proj),
            ("mlp.gate_up_proj", &mut self.mlp.gate_up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ]
    }
}

pub struct Phi3Model {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
}

pub struct Phi3ForCausalLM {
    pub config: Phi3Config,
    pub model: Phi3Model,
    /// The LM head; with tied embeddings it is `model.embed_tokens` (same mapped bytes).
    pub lm_head: Linear,
    pub rope: Rope,
    /// How the caches from [`Phi3ForCausalLM::new_cache`] store keys and values.
    pub kv_cache: KvType,
}

/// What a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last token only: `[vocab]`.
    Last,
    /// Logits of every token: `[n_tokens, vocab]`.
    All,
}

impl Phi3ForCausalLM {
    /// The tensors a checkpoint for `cfg` must hold, with their shapes.
    pub fn expected_tensors(cfg: &Phi3Config) -> Vec<Expected> {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let attn = cfg.num_attention_heads * cfg.head_dim();
        let e = |name: String, shape: Vec<usize>| Expected {
            name,
            shape,
            optional: false,
        };
        let mut out = vec![
            e("model.embed_tokens.weight".into(), vec![v, h]),
            e("model.norm.weight".into(), vec![h]),
        ];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push(e(format!("{p}.input_layernorm.weight"), vec![h]));
            out.push(e(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![cfg.qkv_dim(), h],
            ));
            out.push(e(format!("{p}.self_attn.o_proj.weight"), vec![h, attn]));
            out.push(e(format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push(e(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]));
            out.push(e(format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        // Tied checkpoints carry no lm_head (P5); if one is present anyway, transformers ties
        // over it, and so do we.
        out.push(Expected {
            name: "lm_head.weight".into(),
            shape: vec![v, h],
            optional: cfg.tie_word_embeddings,
        });
        out
    }

    /// [`Self::load`], then ready to run: with `quant` the float matrices are quantized (the
    /// mapping can go afterwards); otherwise, when `prefault`, the mapping is paged in now
    /// rather than during the first tokens (see [`Checkpoint::prefault`]). `source` names the
    /// checkpoint in errors.
    pub fn load_ready(
        config: Phi3Config,
        ckpt: &mut Checkpoint,
        quant: Option<Recipe>,
        source: &std::path::Path,
        prefault: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Phi3ForCausalLM> {
        let load = |ckpt: &Checkpoint| {
            Self::load(config.clone(), ckpt)
                .with_context(|| format!("loading weights from {}", source.display()))
        };
        // Every tensor is checked before any is read.
        let mut model = load(ckpt)?;
        match quant {
            Some(recipe) => model
                .quantize(recipe)
                .with_context(|| format!("quantizing {} ({})", source.display(), recipe.name()))?,
            None if prefault => {
                // Prefaulting may move the tensors into a copy, which the model must view.
                drop(model);
                ckpt.prefault(progress)
                    .with_context(|| format!("reading {}", source.display()))?;
                model = load(ckpt)?;
            }
            None => {}
        }
        Ok(model)
    }

    /// Builds the model from a checkpoint after checking every tensor against the registry.
    pub fn load(config: Phi3Config, ckpt: &Checkpoint) -> Result<Phi3ForCausalLM> {
        let mut t = check_registry(ckpt, &Self::expected_tensors(&config))?;
        let mut take = |name: &str| -> Result<Tensor> {
            t.remove(name)
                .with_context(|| format!("tensor {name} missing after registry check"))
        };
        let vector = |t: Tensor| t.to_f32_vec();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(DecoderLayer {
                input_layernorm: vector(take(&format!("{p}.input_layernorm.weight"))?),
                self_attn: Attention {
                    qkv_proj: Linear::new(take(&format!("{p}.self_attn.qkv_proj.weight"))?)?,
                    o_proj: Linear::new(take(&format!("{p}.self_attn.o_proj.weight"))?)?,
                },
                post_attention_layernorm: vector(take(&format!(
                    "{p}.post_attention_layernorm.weight"
                ))?),
                mlp: Mlp {
                    gate_up_proj: Linear::new(take(&format!("{p}.mlp.gate_up_proj.weight"))?)?,
                    down_proj: Linear::new(take(&format!("{p}.mlp.down_proj.weight"))?)?,
                },
            });
        }
        let embed_tokens = take("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.clone())?
        } else {
            Linear::new(take("lm_head.weight")?)?
        };
        let norm = vector(take("model.norm.weight")?);
        Ok(Self::from_parts(
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        ))
    }

    pub fn from_parts(
        config: Phi3Config,
        embed_tokens: Tensor,
        layers: Vec<DecoderLayer>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Phi3ForCausalLM {
        let rope = Rope::new(&config.rope, config.max_position_embeddings);
        Phi3ForCausalLM {
            config,
            model: Phi3Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            rope,
            kv_cache: KvType::F32,
        }
    }

    /// Every weight by its Hugging Face name (the tied LM head once, as the embedding).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let vector = |v: &[f32]| Tensor::from_f32(vec![v.len()], v);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.model.embed_tokens.clone(),
        )];
        for (l, layer) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.extend([
                (
                    format!("{p}.input_layernorm.weight"),
                    vector(&layer.input_layernorm),
                ),
                (
                    format!("{p}.self_attn.qkv_proj.weight"),
                    layer.self_attn.qkv_proj.weight().clone(),
                ),
                (
                    format!("{p}.self_attn.o_proj.weight"),
                    layer.self_attn.o_proj.weight().clone(),
                ),
                (
                    format!("{p}.post_attention_layernorm.weight"),
                    vector(&layer.post_attention_layernorm),
                ),
                (
                    format!("{p}.mlp.gate_up_proj.weight"),
                    layer.mlp.gate_up_proj.weight().clone(),
                ),
                (
                    format!("{p}.mlp.down_proj.weight"),
                    layer.mlp.down_proj.weight().clone(),
                ),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vector(&self.model.norm)));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.weight().clone()));
        }
        out
    }

    /// Quantizes every float weight matrix to the format `recipe` gives its name; the float
    /// weights are released as each is replaced, matrices already quantized (a quantized GGUF or
    /// checkpoint) keep their format. A tied LM head stays one tensor with the embedding.
    pub fn quantize(&mut self, recipe: Recipe) -> Result<()> {
        self.quantize_weighted(recipe, None)
    }

    /// [`Phi3ForCausalLM::quantize`] with column importances from calibration (by weight name;
    /// see [`Phi3ForCausalLM::collect_stats`]). Tied embeddings take the LM head's: their
    /// rounding matters as the LM head's product, not as the lookup.
    pub fn quantize_weighted(&mut self, recipe: Recipe, imp: Option<&Importance>) -> Result<()> {
        let n = self.model.layers.len();
        if let Some(l) = recipe.max_layer().filter(|&l| l >= n) {
            anyhow::bail!(
                "recipe {} names layer {l}, but the model has {n} layers (0 to {})",
                recipe.name(),
                n - 1
            );
        }
        let of = |name: &str| imp.and_then(|m| m.get(name)).map(Vec::as_slice);
        for (l, layer) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, lin) in layer.linears_mut() {
                let full = format!("{p}.{name}.weight");
                if lin.weight().dtype.is_float() {
                    *lin = lin
                        .quantize_weighted(recipe.qtype(&full), of(&full))
                        .context(full)?;
                }
            }
        }
        if self.model.embed_tokens.dtype.is_float() {
            let embed_imp = if self.config.tie_word_embeddings {
                of("lm_head.weight")
            } else {
                None
            };
            let embed = self
                .model
                .embed_tokens
                .quantize_weighted(recipe.qtype("model.embed_tokens.weight"), embed_imp)?;
            if self.config.tie_word_embeddings {
                self.lm_head = Linear::new(embed.clone())?;
            }
            self.model.embed_tokens = embed;
        }
        if !self.config.tie_word_embeddings && self.lm_head.weight().dtype.is_float() {
            self.lm_head = self
                .lm_head
                .quantize_weighted(recipe.qtype("lm_head.weight"), of("lm_head.weight"))?;
        }
        Ok(())
    }

    /// Starts collecting the input statistics of every projection and the LM head, for
    /// [`Phi3ForCausalLM::take_importance`] after some forward passes.
    pub fn collect_stats(&mut self) {
        for layer in &mut self.model.layers {
            for (_, lin) in layer.linears_mut() {
                lin.collect_stats();
            }
        }
        self.lm_head.collect_stats();
    }

    /// Stops collecting; each matrix's column importances (the mean square of its inputs) by
    /// weight name, and the fewest rows any matrix saw.
    pub fn take_importance(&mut self) -> (Importance, u64) {
        let mut out = Importance::new();
        let mut rows = u64::MAX;
        let mut put = |name: String, lin: &mut Linear| {
            if let Some(s) = lin.take_stats() {
                let (ms, n) = s.mean_squares();
                rows = rows.min(n);
                out.insert(name, ms);
            }
        };
        for (l, layer) in self.model.layers.iter_mut().enumerate() {
            for (name, lin) in layer.linears_mut() {
                put(format!("model.layers.{l}.{name}.weight"), lin);
            }
        }
        put("lm_head.weight".to_string(), &mut self.lm_head);
        (out, if rows == u64::MAX { 0 } else { rows })
    }

    /// How activations meet bf16 weights in every projection and the LM head (see
    /// [`Bf16Acts`]); quantized and f16/f32 weights are not affected.
    pub fn set_bf16_acts(&mut self, acts: Bf16Acts) {
        for layer in &mut self.model.layers {
            for (_, lin) in layer.linears_mut() {
                lin.set_bf16_acts(acts);
            }
        }
        self.lm_head.set_bf16_acts(acts);
    }

    pub fn bf16_acts(&self) -> Bf16Acts {
        self.lm_head.bf16_acts()
    }

    /// How activations meet block-quantized weights in every projection and the LM head (see
    /// [`QuantActs`]); float weights are not affected.
    pub fn set_quant_acts(&mut self, acts: QuantActs) {
        for layer in &mut self.model.layers {
            for (_, lin) in layer.linears_mut() {
                lin.set_quant_acts(acts);
            }
        }
        self.lm_head.set_quant_acts(acts);
    }

    pub fn quant_acts(&self) -> QuantActs {
        self.lm_head.quant_acts()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_hidden_layers,
            self.config.num_kv_heads(),
            self.config.head_dim(),
            self.kv_cache,
        )
    }

    /// Bytes of weights one decode step reads.
    pub fn weight_bytes(&self) -> usize {
        self.decode_weights().iter().map(|p| p.len()).sum()
    }

    /// The weight memory one decode step reads: every layer's projections and the LM head
    /// (the embedding row it also reads is one of 200 K).
    pub fn decode_weights(&self) -> Vec<&[u8]> {
        let mut parts = Vec::new();
        for l in &self.model.layers {
            for (_, lin) in l.linears() {
                parts.extend(lin.weight().parts());
            }
        }
        parts.extend(self.lm_head.weight().parts());
        parts
    }

    /// Token embeddings of `tokens` (the first at position `start`), with the rows `embeds`
    /// gives for some positions (image features) in place of their placeholder tokens'.
    fn embed(
        &self,
        tokens: &[u32],
        start: usize,
        embeds: Option<&InputEmbeds>,
        x: &mut [f32],
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let e = &self.model.embed_tokens;
        for (t, (row, &tok)) in x.chunks_mut(h).zip(tokens).enumerate() {
            if let Some(r) = embeds.and_then(|m| m.row(start + t)) {
                row.copy_from_slice(r);
                continue;
            }
            let t = tok as usize;
            if t >= self.config.vocab_size {
                bail!(
                    "token id {tok} is outside the model's vocabulary ({})",
                    self.config.vocab_size
                );
            }
            e.read_f32(t * h, row);
        }
        Ok(())
    }

    /// Runs `tokens` (the continuation of whatever `cache` holds) through the decoder.
    ///
    /// `table` must be the one the cache was built with; switching tables means clearing the
    /// cache and re-running the whole sequence (the engine's LongRoPE policy does that).
    /// `hidden`, if given, receives the hidden states as transformers' `output_hidden_states`
    /// lists them: the input of every layer, then the final normed output.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        table: RopeTable,
        want: Logits,
        hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(tokens, cache, table, want, hidden, &mut logits)?;
        Ok(logits)
    }

    /// [`Phi3ForCausalLM::forward`] into `logits` (resized). A decode step this way allocates
    /// nothing once its buffers have grown (a new KV page every [`PAGE`] positions aside).
    ///
    /// [`PAGE`]: super::kv_cache::PAGE
    pub fn forward_into(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        table: RopeTable,
        want: Logits,
        hidden: Option<&mut Vec<Vec<f32>>>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_item(BatchItem::new(tokens, cache, table), want, hidden, logits)
    }

    /// [`Phi3ForCausalLM::forward_into`] for one item with its adapter and embedding rows.
    pub fn forward_item(
        &self,
        item: BatchItem<'_>,
        want: Logits,
        mut hidden: Option<&mut Vec<Vec<f32>>>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let n = item.tokens.len();
        let mut items = [item];
        with_scratch(&self.config, n, |s| {
            self.run(&mut items, hidden.as_deref_mut(), s)?;
            let first = match want {
                Logits::Last => n - 1,
                Logits::All => 0,
            };
            let rows = n - first;
            let eps = self.config.rms_norm_eps as f32;
            for (o, r) in s.normed.chunks_mut(h).zip(s.x[first * h..].chunks(h)) {
                rms_norm(r, &self.model.norm, eps, o);
            }
            let normed = &s.normed[..rows * h];
            if let Some(hs) = hidden {
                if want == Logits::All {
                    hs.push(normed.to_vec());
                }
            }
            logits.clear();
            logits.resize(rows * self.config.vocab_size, 0.0);
            self.lm_head.forward(normed, logits);
            Ok(())
        })
    }

    /// Runs several sequences through the decoder in one pass and returns the logits of each
    /// one's last token. Every weight matrix is read once for all rows together (what makes
    /// batched decode cheaper than one pass per sequence); attention stays per sequence.
    ///
    /// A row's result can differ from the solo pass in the last bits (the dot kernels order
    /// their sums by how many rows they take at once), never by more than rounding.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        let n: usize = items.iter().map(|it| it.tokens.len()).sum();
        with_scratch(&self.config, n, |s| {
            self.run(items, None, s)?;
            let eps = self.config.rms_norm_eps as f32;
            let mut end = 0;
            for (i, it) in items.iter().enumerate() {
                end += it.tokens.len();
                let last = &s.x[(end - 1) * h..end * h];
                rms_norm(
                    last,
                    &self.model.norm,
                    eps,
                    &mut s.normed[i * h..(i + 1) * h],
                );
            }
            let v = self.config.vocab_size;
            let mut logits = vec![0f32; items.len() * v];
            self.lm_head
                .forward(&s.normed[..items.len() * h], &mut logits);
            Ok(logits.chunks(v).map(<[f32]>::to_vec).collect())
        })
    }

    /// The decoder layers over the rows of every item: leaves the last layer's output rows
    /// (before the final norm) in `s.x` and advances each cache.
    fn run(
        &self,
        items: &mut [BatchItem<'_>],
        mut hidden: Option<&mut Vec<Vec<f32>>>,
        s: &mut Scratch,
    ) -> Result<()> {
        let cfg = &self.config;
        if items.is_empty() {
            bail!("forward pass needs at least one sequence");
        }
        for it in items.iter() {
            if it.tokens.is_empty() {
                bail!("forward pass needs at least one token");
            }
            if let Some(t) = it.cache.table {
                if t != it.table {
                    bail!(
                        "KV cache was built with the {t:?} rotary table; clear it before using {:?}",
                        it.table
                    );
                }
            }
            let total = it.cache.len + it.tokens.len();
            if total > cfg.max_position_embeddings {
                bail!(
                    "sequence of {total} tokens exceeds the model's context of {} tokens",
                    cfg.max_position_embeddings
                );
            }
        }
        let h = cfg.hidden_size;
        let mut x = std::mem::take(&mut s.x);
        let mut at = 0;
        s.adapters.clear();
        for it in items.iter() {
            let rows = &mut x[at * h..(at + it.tokens.len()) * h];
            if let Err(e) = self.embed(it.tokens, it.cache.len, it.embeds, rows) {
                s.x = x;
                return Err(e);
            }
            at += it.tokens.len();
        }
        if items.iter().any(|it| it.adapter.is_some()) {
            for it in items.iter() {
                s.adapters
                    .extend(std::iter::repeat_n(it.adapter, it.tokens.len()));
            }
        }
        for (l, layer) in self.model.layers.iter().enumerate() {
            if let Some(hs) = hidden.as_deref_mut() {
                hs.push(x.clone());
            }
            self.layer_forward(l, layer, &mut x, items, s);
        }
        s.x = x;
        for it in items.iter_mut() {
            it.cache.len += it.tokens.len();
            it.cache.table = Some(it.table);
        }
        Ok(())
    }

    fn layer_forward(
        &self,
        l: usize,
        layer: &DecoderLayer,
        x: &mut [f32],
        items: &mut [BatchItem<'_>],
        s: &mut Scratch,
    ) {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        for (o, r) in s.normed.chunks_mut(h).zip(x.chunks(h)) {
            rms_norm(r, &layer.input_layernorm, eps, o);
        }
        layer
            .self_attn
            .qkv_proj
            .forward_with(&s.normed, &mut s.qkv, &s.adapters);
        self.attention(l, items, s);
        layer
            .self_attn
            .o_proj
            .forward_with(&s.attn, &mut s.proj, &s.adapters);
        for (a, b) in x.iter_mut().zip(&s.proj) {
            *a += b;
        }
        for (o, r) in s.normed.chunks_mut(h).zip(x.chunks(h)) {
            rms_norm(r, &layer.post_attention_layernorm, eps, o);
        }
        layer
            .mlp
            .gate_up_proj
            .forward_with(&s.normed, &mut s.gate_up, &s.adapters);
        let i = cfg.intermediate_size;
        for (act, gu) in s.act.chunks_mut(i).zip(s.gate_up.chunks_mut(2 * i)) {
            let (gate, up) = gu.split_at_mut(i);
            silu_mul(gate, up);
            act.copy_from_slice(gate);
        }
        layer
            .mlp
            .down_proj
            .forward_with(&s.act, &mut s.proj, &s.adapters);
        for (a, b) in x.iter_mut().zip(&s.proj) {
            *a += b;
        }
    }

    /// Rotates q and k of the new tokens, appends k and v to each item's cache, and writes the
    /// causal attention output of every new token to `s.attn`.
    fn attention(&self, l: usize, items: &mut [BatchItem<'_>], s: &mut Scratch) {
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let group = nh / nkv;
        let qkv_dim = cfg.qkv_dim();
        let half = self.rope.half_dim();
        s.cos.resize(half, 0.0);
        s.sin.resize(half, 0.0);
        // (item, position) of every row.
        s.rows.clear();
        let mut r = 0;
        for (i, it) in items.iter_mut().enumerate() {
            let start = it.cache.len;
            for t in 0..it.tokens.len() {
                self.rope
                    .cos_sin(it.table, start + t, &mut s.cos, &mut s.sin);
                let row = &mut s.qkv[r * qkv_dim..(r + 1) * qkv_dim];
                for head in row[..(nh + nkv) * hd].chunks_mut(hd) {
                    rope_neox(head, &s.cos, &s.sin);
                }
                for h in 0..nkv {
                    let (k, v) = ((nh + h) * hd, (nh + nkv + h) * hd);
                    it.cache
                        .write(l, h, start + t, &row[k..k + hd], &row[v..v + hd]);
                }
                s.rows.push((i, start + t));
                r += 1;
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &s.qkv;
        // Items with a long run of new tokens (a prefill) go through blocked matrix products;
        // the rest (decode steps) one row at a time below.
        s.blocked.clear();
        s.blocked.resize(s.rows.len(), false);
        let mut first = 0;
        for it in items.iter() {
            let n = it.tokens.len();
            if n >= BLOCKED_ATTENTION_MIN {
                s.blocked[first..first + n].fill(true);
                let cache = &*it.cache;
                let start = cache.len; // updated after the last layer

                // Jobs write disjoint (rows, head) blocks of the attention output.
                let out = SharedOut::new(&mut s.attn);
                let blocks = n.div_ceil(QUERY_BLOCK);
                (0..nh * blocks).into_par_iter().for_each(|job| {
                    let (head, b) = (job / blocks, job % blocks);
                    let (q0, q1) = (b * QUERY_BLOCK, ((b + 1) * QUERY_BLOCK).min(n));
                    let kvh = head / group;
                    {
                        // Not the thread's kept buffers: a prefill's scores grow with the
                        // context and are not worth holding on to.
                        let keys = start + q1;
                        let (mut sc, mut rows) = (Vec::new(), Vec::new());
                        sc.clear();
                        sc.resize((q1 - q0) * keys, 0.0);
                        for (p0, pn, page) in pages(cache.keys(l, kvh), keys, hd) {
                            let kp = page.to_f32(pn, hd, &mut rows);
                            // SAFETY: every pointer/stride pair below stays inside qkv (rows
                            // first+q0..first+q1), the page (pn rows of hd) and sc (columns
                            // p0..p0+pn of q1-q0 rows of keys).
                            unsafe {
                                attend_block_scores(
                                    q1 - q0,
                                    pn,
                                    hd,
                                    qkv.as_ptr().add((first + q0) * qkv_dim + head * hd),
                                    qkv_dim,
                                    kp.as_ptr(),
                                    scale,
                                    sc.as_mut_ptr().add(p0),
                                    keys,
                                );
                            }
                        }
                        for (t, row) in sc.chunks_mut(keys).enumerate() {
                            let visible = start + q0 + t + 1;
                            softmax(&mut row[..visible]);
                            row[visible..].fill(0.0);
                        }
                        let o = out;
                        for (p0, pn, page) in pages(cache.values(l, kvh), keys, hd) {
                            let vp = page.to_f32(pn, hd, &mut rows);
                            // SAFETY: as above; each job writes its own output block, rows
                            // first+q0..first+q1, columns head*hd..(head+1)*hd of attn, and
                            // accumulates into it from the second page on.
                            unsafe {
                                attend_block_values(
                                    q1 - q0,
                                    pn,
                                    hd,
                                    sc.as_ptr().add(p0),
                                    keys,
                                    vp.as_ptr(),
                                    o.get().add((first + q0) * nh * hd + head * hd),
                                    nh * hd,
                                    p0 > 0,
                                );
                            }
                        }
                    }
                });
            }
            first += it.tokens.len();
        }
        // One job per (row, kv head): the `group` query heads sharing that kv head are adjacent
        // in the row, so each key and value is read once for all of them.
        // Each job's buffers belong to its (row, kv head) slot, not to the thread that runs
        // it: which worker steals which job varies from step to step, and a worker's first job
        // would allocate in the middle of decode.
        let (rows, blocked) = (&s.rows, &s.blocked);
        if s.attn_ws.len() < rows.len() * nkv {
            s.attn_ws
                .resize_with(rows.len() * nkv, AttnScratch::default);
        }
        s.attn
            .par_chunks_mut(group * hd)
            .zip(s.attn_ws.par_iter_mut())
            .enumerate()
            .filter(|(idx, _)| !blocked[idx / nkv])
            .for_each(|(idx, (out, ws))| {
                let (t, kvh) = (idx / nkv, idx % nkv);
                let (item, pos) = rows[t];
                let cache = &*items[item].cache;
                let q = &qkv[t * qkv_dim + kvh * group * hd..][..group * hd];
                attend_one(
                    q,
                    cache.keys(l, kvh),
                    cache.values(l, kvh),
                    pos + 1,
                    hd,
                    scale,
                    out,
                    ws,
                );
            });
    }
}

/// From this many new tokens in one item, attention runs as blocked matrix products.
const BLOCKED_ATTENTION_MIN: usize = 16;
/// Query rows per block: the scores of one block are `QUERY_BLOCK × keys` floats, so memory
/// grows linearly with the context, never with its square.
const QUERY_BLOCK: usize = 64;

/// One sequence's share of a batched forward pass: its new tokens, its cache and the rotary
/// table that cache uses; for Phi-4-multimodal also the adapter its rows use and the embedding
/// rows (image features) that stand in for its placeholder tokens.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub table: RopeTable,
    /// The LoRA adapter of every row of this item (`None`: the base weights).
    pub adapter: Option<AdapterId>,
    pub embeds: Option<&'a InputEmbeds>,
}

impl<'a> BatchItem<'a> {
    /// A text-only item on the base weights.
    pub fn new(tokens: &'a [u32], cache: &'a mut KvCache, table: RopeTable) -> BatchItem<'a> {
        BatchItem {
            tokens,
            cache,
            table,
            adapter: None,
            embeds: None,
        }
    }
}

/// Embedding rows that replace the token embeddings at some absolute positions of a sequence
/// (the merge of image features into the placeholder ids: spec §3.7).
#[derive(Debug, Clone, Default)]
pub struct InputEmbeds {
    /// Ascending positions.
    positions: Vec<usize>,
    /// One row of `hidden` values per position.
    rows: Vec<f32>,
    hidden: usize,
}

impl InputEmbeds {
    pub fn new(positions: Vec<usize>, rows: Vec<f32>, hidden: usize) -> Result<InputEmbeds> {
        if rows.len() != positions.len() * hidden {
            bail!(
                "{} embedding values for {} positions of width {hidden}",
                rows.len(),
                positions.len()
            );
        }
        if positions.windows(2).any(|w| w[0] >= w[1]) {
            bail!("embedding positions must ascend");
        }
        Ok(InputEmbeds {
            positions,
            rows,
            hidden,
        })
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// The prompt positions the rows replace, ascending.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The row for position `p`, if one replaces its token.
    pub fn row(&self, p: usize) -> Option<&[f32]> {
        let i = self.positions.binary_search(&p).ok()?;
        Some(&self.rows[i * self.hidden..(i + 1) * self.hidden])
    }
}

/// Activation buffers of one forward pass, sized for its token count.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// (item, position) of every row.
    rows: Vec<(usize, usize)>,
    /// Rows whose attention runs blocked (prefills).
    blocked: Vec<bool>,
    /// Buffers of the one-row attention jobs, one per (row, kv head).
    attn_ws: Vec<AttnScratch>,
    /// The adapter of every row; empty when no row has one.
    adapters: Vec<Option<AdapterId>>,
}

impl Scratch {
    fn resize(&mut self, cfg: &Phi3Config, n: usize) {
        let h = cfg.hidden_size;
        for (buf, width) in [
            (&mut self.x, h),
            (&mut self.normed, h),
            (&mut self.qkv, cfg.qkv_dim()),
            (&mut self.attn, cfg.num_attention_heads * cfg.head_dim()),
            (&mut self.proj, h),
            (&mut self.gate_up, 2 * cfg.intermediate_size),
            (&mut self.act, cfg.intermediate_size),
        ] {
            buf.clear();
            buf.resize(n * width, 0.0);
        }
    }
}

/// Forward passes of up to this many rows keep their buffers for the next pass on the thread
/// (decode steps, small batches); a long prefill's are freed after it.
const KEEP_SCRATCH_ROWS: usize = 64;

thread_local! {
    static FORWARD_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` on a thread of the rayon pool with activation buffers for `n` rows: the thread's
/// kept ones when free (a forward pass called from inside another on the same thread, e.g. a
/// rayon worker that stole one, gets fresh ones).
///
/// Called from outside the pool, the whole pass moves onto a worker first. Otherwise each of
/// a decode step's ~160 parallel products would hand its work to the pool and put the caller
/// to sleep until it is done, and the workers would fall asleep in the serial stretches
/// between products: two thread wake-ups per product. One hop per pass instead, q4 decode at
/// 512 positions, 2 threads, steps alternating both ways: +1–4 % back to back (five runs,
/// median +1 %), +6–7 % with a 5 ms pause before each step, when every thread has gone to
/// sleep (as between a server's requests or a chat's turns).
fn with_scratch<R: Send>(
    cfg: &Phi3Config,
    n: usize,
    f: impl FnOnce(&mut Scratch) -> R + Send,
) -> R {
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| with_scratch(cfg, n, f));
    }
    FORWARD_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) if n <= KEEP_SCRATCH_ROWS => {
            s.resize(cfg, n);
            f(&mut s)
        }
        _ => {
            let mut s = Scratch::default();
            s.resize(cfg, n);
            f(&mut s)
        }
    })
}
