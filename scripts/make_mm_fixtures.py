#!/usr/bin/env python3
"""Writes the Phi-4-multimodal reference fixtures the Rust test-suite compares against.

A tiny random Phi-4-multimodal is built with transformers' native `Phi4MultimodalForCausalLM`
(eager attention: under SDPA its vision tower attends causally, spec P9) and saved in both
checkpoint layouts:
  * tests/fixtures/tiny-phi4mm/         transformers-native (`phi4_multimodal`), plain LM linears,
                                        `vision-lora/` and `speech-lora/` PEFT folders;
  * tests/fixtures/tiny-phi4mm-remote/  Microsoft's remote-code layout (`phi4mm`): PEFT-wrapped LM
                                        linears (`base_layer`, `lora_A.vision`, ...) in the one file.
Same weights in both. The vocabulary is the tiny one of make_fixtures.py (o200k ranks 0..499, the
Phi-4 specials at 500..511) plus the two placeholders `<|endoftext10|>` = 512 (image) and
`<|endoftext11|>` = 513 (audio); the config names them (`vision_config.image_token_id`,
`audio_config.audio_token_id`) as the real ones name 200010 / 200011.

Test images are made from an integer formula (`pattern_image`) that the Rust tests evaluate too, so
no large picture is committed. The reference records, per image size: the crop grid, the resized
and white-padded uint8 canvas (its SHA-256: the resize must be bit-exact), the patch masks, the
token count and every 32nd row of the bicubic global view; for the main image the vision tower's
feature layer, the pooled maps and the projected image embeddings; and per input mode (text -> no
adapter, image -> vision adapter) the prompt ids, logits at every position and a greedy
continuation with its logits.

Pinned in scripts/requirements-fixtures.txt (+ the packages named there for this script). CI never
runs it; its outputs are committed. Regenerate with:

    .venv-fixtures/bin/python scripts/make_mm_fixtures.py
"""

import hashlib
import json
import math
import os
import pathlib
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as mf  # noqa: E402  (tokenizer builder, tiny specials, chat template)

IMAGE_ID, AUDIO_ID = 512, 513
VOCAB = 520
IMAGE_TOKEN, AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
VISION_LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)  # real scale alpha/r = 2.0
SPEECH_LORA = dict(r=6, lora_alpha=12, lora_dropout=0.01)

# (width, height): tiny (upscaled), padded columns, tall, wide with padded rows, square grid,
# and two past 36 crops (the aspect-ratio search).
PROCESSOR_CASES = [(100, 80), (500, 300), (200, 700), (1000, 300), (448, 448), (1344, 896), (3000, 2250), (2900, 2900)]
MAIN_IMAGE = (500, 300)
SECOND_IMAGE = (100, 80)
# 16 kHz clips made by `synth_pcm` (the Rust tests evaluate it too): (name, samples, seed).
# "short" is 1 s plus an odd tail, "main" 3 s (298 mel frames, 38 tokens), "long" 41 s: 4098 frames,
# 513 encoder frames, so past the encoder's 500-frame chunk (the last chunk zero-padded).
AUDIO_CLIPS = [("short", 16123, 7), ("main", 48000, 6), ("long", 656000, 5)]
LONG_FEATURE_STRIDE = 64  # rows of the long clip's features kept in the reference


def pattern_image(w, h):
    """RGB uint8 [h, w, 3] from integer arithmetic only (tests/common evaluates the same formula):
    gradients, a checkerboard and a hash-like texture, so resampling hits many rounding cases."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    hsh = (x * 73856093) ^ (y * 19349663)
    r = (x * 255 // max(w - 1, 1) + (hsh & 31)) & 255
    g = (y * 255 // max(h - 1, 1) + ((hsh >> 5) & 15)) & 255
    b = ((((x >> 4) + (y >> 4)) & 1) * 180 + ((hsh >> 9) & 63)) & 255
    return np.stack([r, g, b], -1).astype(np.uint8)


def synth_pcm(n, seed):
    """Deterministic int16 "speech-like" samples from integer arithmetic only (so Rust reproduces
    them exactly): xorshift32 noise and a 37-sample triangle tone under a 0.5 s triangle envelope,
    with a 0.3 s pause (noise floor only) at the end of every 2.5 s."""
    state = seed & 0xFFFFFFFF
    out = np.empty(n, dtype=np.int16)
    for i in range(n):
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        noise = (state >> 16) - 32768
        k = i % 37
        tone = (k if k < 19 else 37 - k) * 1200 - 10800
        e = i % 8000
        env = 0 if i % 40000 >= 35200 else (e if e < 4000 else 8000 - e) // 4
        v = (noise // 4 + tone) * env // 1000 + noise // 256
        out[i] = max(-32768, min(32767, v))
    return out


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _, ranks = mf.load_o200k_ranks()
    specials = mf.tiny_specials() + [(IMAGE_ID, IMAGE_TOKEN, True, False), (AUDIO_ID, AUDIO_TOKEN, True, False)]
    tjson = mf.build_tokenizer_json(ranks, mf.TINY_RANKS, specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tjson)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
    )
    tok.chat_template = mf.PHI4_CHAT_TEMPLATE
    return tok


def tiny_config():
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig

    ids = mf.tiny_ids()
    vision = Phi4MultimodalVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,  # feature_layer -2: the last layer is never used, as 27 of 27
        num_attention_heads=2,
        image_size=448,  # the processor hard-codes 448/14 (32x32 patch masks)
        patch_size=14,
        crop_size=448,
        feature_layer=-2,
        image_token_id=IMAGE_ID,
    )
    audio = Phi4MultimodalAudioConfig(
        hidden_size=32,
        intermediate_size=48,
        num_blocks=2,
        num_attention_heads=2,
        ext_pw_out_channel=32,
        depthwise_separable_out_channel=32,
        nemo_conv_channels=16,
        bias_max_distance=500,
        input_size=80,
        time_reduction=8,
        audio_token_id=AUDIO_ID,
    )
    return Phi4MultimodalConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,  # head_dim 16, GQA 3:1
        num_key_value_heads=1,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 1024,
            "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3],
            "long_factor": [1.0, 1.5, 2.3, 3.7, 5.1, 8.0],
        },
        tie_word_embeddings=True,
        sliding_window=None,
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
        vision_config=vision,
        audio_config=audio,
    )


def randomize(model, seed):
    """Weights with enough spread for clear greedy margins, rounded to bf16 values."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.2 * rnd(p.shape))
            elif leaf in ("bias", "b1", "b2"):
                p.copy_(0.2 * rnd(p.shape))
            elif leaf == "weight" and p.ndim >= 2 and name != "model.embed_tokens.weight" \
                    and "position_embedding" not in name and "bias_values" not in name:
                p.copy_(rnd(p.shape) / math.sqrt(p[0].numel()) * 1.5)
            elif "bias_values" in name:
                p.copy_(0.5 * rnd(p.shape))
            else:  # token / position embeddings, separators, pooling-head probe
                p.copy_(rnd(p.shape))
            p.copy_(p.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if name.endswith("global_mean"):
                b.copy_((10.0 + rnd(b.shape)).to(torch.bfloat16).float())
            elif name.endswith("global_invstd"):
                b.copy_((0.2 + 0.1 * torch.rand(b.shape, generator=g)).to(torch.bfloat16).float())


def lm_linear_shapes(cfg):
    hd = cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    return {
        "self_attn.qkv_proj": (qkv, cfg.hidden_size),
        "self_attn.o_proj": (cfg.hidden_size, cfg.num_attention_heads * hd),
        "mlp.gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size),
        "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size),
    }


def random_lora(cfg, r, seed):
    """Adapter tensors as transformers' converter writes them (`...lora_A.weight`, no adapter name)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_hidden_layers):
        for mod, (o, n) in lm_linear_shapes(cfg).items():
            out[f"model.layers.{i}.{mod}.lora_A.weight"] = (torch.randn(r, n, generator=g) / math.sqrt(n)).to(torch.bfloat16)
            out[f"model.layers.{i}.{mod}.lora_B.weight"] = (torch.randn(o, r, generator=g) / math.sqrt(r) * 0.5).to(torch.bfloat16)
    return out


def write_adapter(out_dir, name, tensors, spec):
    from peft import LoraConfig

    d = out_dir / f"{name}-lora"
    LoraConfig(target_modules=LORA_TARGETS, task_type="CAUSAL_LM", **spec).save_pretrained(d)
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})


# Inverse of transformers' convert_phi4_multimodal_weights_to_hf.py mapping (native -> remote code).
NATIVE_TO_REMOTE = [
    (r"(encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj", r"\1.net.0.linear"),
    (r"(encoders\.\d+\.feed_forward_(?:in|out))\.down_proj", r"\1.net.2"),
    (r"(encoders\.\d+\.self_attn)\.([qkv])_proj", r"\1.linear_\2"),
    (r"(encoders\.\d+\.self_attn)\.o_proj", r"\1.linear_out"),
    (r"image_embed\.img_projection_up", "image_embed.img_projection.0"),
    (r"image_embed\.img_projection_down", "image_embed.img_projection.2"),
    (r"image_embed\.global_img_feature_extensor", "image_embed.glb_GN"),
    (r"image_embed\.sub_img_feature_extensor", "image_embed.sub_GN"),
    (r"audio_embed\.up_proj_for_speech", "audio_embed.audio_projection.speech.0"),
    (r"audio_embed\.down_proj_for_speech", "audio_embed.audio_projection.speech.2"),
    (r"audio_embed\.up_proj_for_vision_speech", "audio_embed.audio_projection.vision.0"),
    (r"audio_embed\.down_proj_for_vision_speech", "audio_embed.audio_projection.vision.2"),
]


def remote_layout(native, cfg, vision_lora, speech_lora):
    out = {}
    lm_mods = "|".join(map(re.escape, lm_linear_shapes(cfg)))
    for k, v in native.items():
        if k == "lm_head.weight":
            continue  # tied
        nk = k
        for pat, rep in NATIVE_TO_REMOTE:
            nk, n = re.subn(pat, rep, nk)
            if n:
                break
        m = re.match(r"(model\.layers\.\d+\.(?:%s))\.weight$" % lm_mods, nk)
        if m:
            nk = f"{m.group(1)}.base_layer.weight"
        out[nk] = v
    for name, lora in (("vision", vision_lora), ("speech", speech_lora)):
        for k, v in lora.items():
            out[k.replace(".weight", f".{name}.weight")] = v
    return out


def remote_config(cfg):
    """config.json as Microsoft's remote code writes it (spec §3.2), for the tiny sizes. The vision
    sizes travel as `vision_config` (the project's convention; the real file hard-codes SigLIP)."""
    text = cfg.to_dict()
    vc, ac = cfg.vision_config, cfg.audio_config
    keep = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "sliding_window", "bos_token_id", "eos_token_id",
            "pad_token_id", "attention_bias", "resid_pdrop", "embd_pdrop", "attention_dropout", "initializer_range"]
    out = {k: text[k] for k in keep if k in text}
    rp = cfg.rope_parameters
    out.update({
        "architectures": ["Phi4MMForCausalLM"],
        "model_type": "phi4mm",
        "rope_theta": rp["rope_theta"],
        "partial_rotary_factor": rp["partial_rotary_factor"],
        "rope_scaling": {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]},
        "full_attn_mod": 1,
        "interpolate_factor": 1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "_attn_implementation": "flash_attention_2",
        "embd_layer": {
            "embedding_cls": "image_audio",
            "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image", "enable_gradient_checkpointing": True,
                                 "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                                 "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True},
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                                 "enable_gradient_checkpointing": True, "projection_cls": "mlp",
                                 "use_conv_downsample": False, "use_qformer": False},
        },
        "img_processor": None,
        "vision_config": {
            "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
            "image_size": vc.image_size, "patch_size": vc.patch_size, "layer_norm_eps": vc.layer_norm_eps,
            "hidden_act": vc.hidden_act, "image_token_id": IMAGE_ID,
        },
        "audio_processor": {"name": "cascades", "config": {
            "activation": "swish", "attention_dim": ac.hidden_size, "attention_heads": ac.num_attention_heads,
            "batch_norm": False, "bias_in_glu": True, "causal": True, "chunk_size": -1, "cnn_layer_norm": True,
            "conv_activation": "swish", "conv_glu_type": "swish", "depthwise_multiplier": 1,
            "depthwise_seperable_out_channel": ac.depthwise_separable_out_channel, "dropout_rate": 0.0,
            "encoder_embedding_config": {"input_size": ac.input_size}, "ext_pw_kernel_size": 1,
            "ext_pw_out_channel": ac.ext_pw_out_channel, "input_layer": "nemo_conv", "input_size": ac.input_size,
            "kernel_size": ac.kernel_size, "left_chunk": ac.left_chunk, "linear_units": ac.intermediate_size,
            "nemo_conv_settings": {"conv_channels": ac.nemo_conv_channels}, "num_blocks": ac.num_blocks,
            "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": ac.bias_max_distance},
            "time_reduction": ac.time_reduction, "audio_token_id": AUDIO_ID,
        }},
        "vision_lora": {"r": VISION_LORA["r"], "lora_alpha": VISION_LORA["lora_alpha"], "dp": VISION_LORA["lora_dropout"],
                        "layer": r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))"},
        "speech_lora": {"r": SPEECH_LORA["r"], "lora_alpha": SPEECH_LORA["lora_alpha"], "dp": SPEECH_LORA["lora_dropout"],
                        "layer": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))"},
    })
    return out


def select_lora(model, adapter):
    """One LoRA (or none) on every PEFT-wrapped linear (what the remote code's set_lora_adapter does;
    transformers 5.25's own switch demands a peft newer than PyPI has)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if adapter is None:
                module.enable_adapters(False)
            else:
                module.enable_adapters(True)
                module.set_adapter(adapter)


def greedy(model, inputs, n):
    mm = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        full = model(input_ids=inputs["input_ids"], **mm).logits[0]
    gen = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logits = torch.stack(out.logits, 1)[0].float()
    top2 = torch.cat([full[-1:], logits]).topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return gen, logits, full.float(), margin


def chw(img):
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def main():
    import transformers
    from PIL import Image
    from transformers import (Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM,
                              Phi4MultimodalImageProcessor, Phi4MultimodalProcessor)

    native_dir, remote_dir = FIX / "tiny-phi4mm", FIX / "tiny-phi4mm-remote"
    for d in (native_dir, remote_dir):
        d.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    ip = Phi4MultimodalImageProcessor()  # defaults = the real preprocessor (448, 14, dynamic_hd 36)
    proc = Phi4MultimodalProcessor(image_processor=ip, audio_processor=Phi4MultimodalFeatureExtractor(),
                                   tokenizer=tok, chat_template=mf.PHI4_CHAT_TEMPLATE)
    assert (tok.image_token_id, tok.audio_token_id) == (IMAGE_ID, AUDIO_ID)
    ref, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__,
                     "image_token_id": IMAGE_ID, "processor": [], "modes": {}}

    # 1. processor: grid, canvas (exact), masks, token count, sampled global view
    for (w, h) in PROCESSOR_CASES:
        img = pattern_image(w, h)
        out = ip(images=[Image.fromarray(img)], return_tensors="pt")
        pix, mask = out["image_pixel_values"][0], out["image_attention_mask"][0]
        (gw, gh), new_size, pad = ip._get_crop_layout(h, w, 448, max_num=36)
        canvas, _ = ip.dynamic_preprocess(chw(img), 448, 14, 32, max_num=36)
        assert canvas.dtype == torch.uint8
        # The crops are exactly the normalised canvas: what the hash pins is what the model sees.
        norm = (canvas.float() - 127.5) / 127.5
        crops = norm.reshape(3, gh, 448, gw, 448).permute(1, 3, 0, 2, 4).reshape(-1, 3, 448, 448)
        assert torch.equal(crops, pix[1:]), (w, h)
        key = f"proc.{w}x{h}"
        ref[f"{key}.mask"] = mask.float().contiguous()  # open_safetensors reads floats
        ref[f"{key}.global_rows"] = pix[0][:, ::32, :].contiguous()
        case = {"width": w, "height": h, "grid": [gw, gh], "resized": list(new_size), "padding": list(pad),
                "image_sizes": out["image_sizes"][0].tolist(), "num_img_tokens": int(out["num_img_tokens"][0]),
                "canvas_sha256": hashlib.sha256(canvas.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()}
        meta["processor"].append(case)
        print(f"{w}x{h}: grid {gw}x{gh}, resized {new_size}, pad {pad}, tokens {case['num_img_tokens']}")

    # 2. tiny model in both layouts + adapters; the reference runs from the native files, in f32
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Phi4MultimodalForCausalLM(cfg).eval()
    randomize(model, 1234)
    model.to(torch.bfloat16).save_pretrained(native_dir, safe_serialization=True)
    vision_lora = random_lora(cfg, VISION_LORA["r"], 11)
    speech_lora = random_lora(cfg, SPEECH_LORA["r"], 12)
    write_adapter(native_dir, "vision", vision_lora, VISION_LORA)
    write_adapter(native_dir, "speech", speech_lora, SPEECH_LORA)
    native = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(remote_layout(native, cfg, vision_lora, speech_lora), remote_dir / "model.safetensors",
              metadata={"format": "pt"})
    (remote_dir / "config.json").write_text(json.dumps(remote_config(cfg), indent=2) + "\n")
    for d in (native_dir, remote_dir):
        tok.save_pretrained(d)
    del model
    model = Phi4MultimodalForCausalLM.from_pretrained(native_dir, dtype=torch.float32, attn_implementation="eager",
                                                      local_files_only=True).eval()
    model.load_adapter(str(native_dir), adapter_name="vision", adapter_kwargs={"subfolder": "vision-lora"})
    model.load_adapter(str(native_dir), adapter_name="speech", adapter_kwargs={"subfolder": "speech-lora"})
    sub = model.model.embed_tokens_extend

    # 3. vision tower stages for the main image
    main_img = Image.fromarray(pattern_image(*MAIN_IMAGE))
    enc = proc(text=IMAGE_TOKEN, images=[main_img], return_tensors="pt")
    with torch.no_grad():
        pix = enc["image_pixel_values"].flatten(0, 1)
        pmask = enc["image_attention_mask"].flatten(0, 1).bool()
        vt = sub.image_embed.img_processor(pix, patch_attention_mask=pmask, output_hidden_states=True)
        pooled = sub.image_embed.get_img_features(pix, attention_mask=pmask)
        base = model.model.embed_tokens(enc["input_ids"])
        merged = sub.image_embed(enc["input_ids"], base, image_pixel_values=enc["image_pixel_values"],
                                 image_sizes=enc["image_sizes"], image_attention_mask=enc["image_attention_mask"])
    ref["vision.feature_layer"] = vt.hidden_states[cfg.vision_config.feature_layer].contiguous()
    ref["vision.pooled"] = pooled.contiguous()
    ref["image.embeds"] = merged[0][enc["input_ids"][0] == IMAGE_ID].contiguous()
    print(f"image embeds {tuple(ref['image.embeds'].shape)}")

    # 3b. audio: features (the native extractor, 16 kHz mono), the encoder's stages, both projections
    meta["audio"] = {"clips": {}, "long_feature_stride": LONG_FEATURE_STRIDE,
                     "mel_filters_nonzero": int((proc.audio_processor.mel_filters > 0).sum())}
    ref["audio.mel_filters"] = torch.from_numpy(proc.audio_processor.mel_filters).float().contiguous()  # [257, 80]
    clips = {}
    ae = sub.audio_embed
    for name, n, seed in AUDIO_CLIPS:
        wave = synth_pcm(n, seed).astype(np.float32) / 32768.0
        clips[name] = wave
        fe = proc.audio_processor(wave, sampling_rate=16000, return_tensors="pt")
        feats = fe["audio_input_features"]
        with torch.no_grad():
            enc_out = ae.encoder(feats.float(), None)
            sp = ae.down_proj_for_speech(torch.nn.functional.gelu(ae.up_proj_for_speech(enc_out)))
            vs = ae.down_proj_for_vision_speech(torch.nn.functional.gelu(ae.up_proj_for_vision_speech(enc_out)))
        if name == "long":
            ref[f"audio.{name}.features_rows"] = feats[0, ::LONG_FEATURE_STRIDE].contiguous()
        else:
            ref[f"audio.{name}.features"] = feats[0].contiguous()
        ref[f"audio.{name}.encoder_out"] = enc_out[0].contiguous()
        if name == "main":
            with torch.no_grad():
                x = ae.encoder.encoder_embedding(feats.float())
                ref["audio.main.subsampled"] = ae.encoder.embed(x, None)[0][0].contiguous()
            ref["audio.main.embeds_speech"] = sp[0].contiguous()
            ref["audio.main.embeds_vision_speech"] = vs[0].contiguous()
        meta["audio"]["clips"][name] = {"samples": n, "seed": seed, "frames": int(feats.shape[1]),
                                        "tokens": int(fe["audio_embed_sizes"][0]),
                                        "features_sum": float(feats.double().sum())}
        print(f"audio {name}: {n} samples -> {feats.shape[1]} frames -> {int(fe['audio_embed_sizes'][0])} tokens;"
              f" encoder out {tuple(enc_out.shape)}")

    # 4. per mode: the prompt as a user writes it, the adapter the mode routes to
    second = Image.fromarray(pattern_image(*SECOND_IMAGE))
    modes = {
        "text": ("<|user|>What is the capital of France?<|end|><|assistant|>", [], None, True),
        "image": ("<|user|><|image_1|>Describe the image.<|end|><|assistant|>", [main_img], "vision", True),
        "two_images": ("<|user|>First <|image_1|> then <|image_2|>: compare.<|end|><|assistant|>",
                       [main_img, second], "vision", False),
        "audio": ("<|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>", [], "speech", True,
                  ["main"]),
        "image_audio": ("<|user|><|image_1|><|audio_1|>Answer the question in the audio.<|end|><|assistant|>",
                        [main_img], "vision", False, ["main"]),
    }
    for name, (prompt, images, adapter, all_logits, *rest) in modes.items():
        audios = rest[0] if rest else []
        text = re.sub(r"<\|image_\d+\|>", IMAGE_TOKEN, prompt)
        text = re.sub(r"<\|audio_\d+\|>", AUDIO_TOKEN, text)
        kw = {"audio": [clips[a] for a in audios]} if audios else {}
        inputs = proc(text=text, images=images or None, return_tensors="pt", **kw)
        select_lora(model, adapter)
        gen, logits, full, margin = greedy(model, inputs, 6)
        ids = inputs["input_ids"][0].tolist()
        if all_logits:
            ref[f"mode.{name}.logits"] = full.contiguous()
        else:
            ref[f"mode.{name}.logits_last"] = full[-1].contiguous()
        ref[f"mode.{name}.greedy_logits"] = logits.contiguous()
        meta["modes"][name] = {"prompt": prompt, "images": [list(i.size) for i in images], "audios": audios,
                               "adapter": adapter,
                               "prompt_ids": ids, "greedy_ids": gen, "min_margin": margin}
        print(f"[{name}] adapter={adapter} prompt {len(ids)} tokens, greedy {gen}, margin {margin:.4f}")
    # The adapter matters: the text prompt with the vision adapter differs from the base.
    with torch.no_grad():
        ids = torch.tensor([meta["modes"]["text"]["prompt_ids"]])
        select_lora(model, "vision")
        ref["mode.text_with_vision_lora.logits_last"] = model(input_ids=ids).logits[0, -1].float().contiguous()
    diff = float((ref["mode.text_with_vision_lora.logits_last"] - ref["mode.text.logits"][-1]).abs().max())
    print(f"text prompt, vision adapter vs none: max |diff| {diff:.4f}")
    assert diff > 0.05

    save_file(ref, str(FIX / "tiny-phi4mm-reference.safetensors"))
    (FIX / "tiny-phi4mm-reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    for p in sorted([*native_dir.rglob("*"), *remote_dir.rglob("*"), *FIX.glob("tiny-phi4mm-reference.*")]):
        if p.is_file():
            print(f"{p.relative_to(FIX)}  {p.stat().st_size:,} B")


if __name__ == "__main__":
    main()
