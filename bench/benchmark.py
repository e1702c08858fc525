"""Training and evaluation speed of DeepSeek-OCR v1 (ours) and OCR-2 (transformers) on one GPU.

    python -m bench.benchmark --out DIR            # full-size models, random weights, one CUDA device
    python -m bench.benchmark --out DIR --quick    # tiny models on CPU in seconds (debugging, CI)

Everything is measured in ONE run on ONE card, so every speed-up is a ratio against the in-run baseline:

* ``v1 baseline``: the seed's recipe done the plain way in our code: Gundam mode (273 image tokens per text
  line), batch 2, eager attention, experts looped in Python (each expert's PEFT LoRA forward), vision one
  image at a time, pageable (unpinned) host batches, plain ``torch.optim.AdamW``.
* then one change at a time (grouped experts, SDPA, batched vision, pinned bf16 batches + fused AdamW,
  larger batches), and the line-sized modes ``tiny`` (73 tokens) and ``small`` (111 tokens);
* OCR-2: plain transformers (HF loss over all logits) against our pipeline's batches (supervised logits only)
  at the same batch;
* evaluation: ``dsocr.generation.generate_batched`` of 512 synthetic lines at a large batch against one line at a
  time (timed on a subset; lines/s is a rate), same model, same ``max_new_tokens``.

The model is full size with random weights (speed depends on shapes, not values), LoRA r=16 on
q/k/v/o/gate/up/down exactly as the pipeline builds it (``family.lora_targets`` + the same ``LoraConfig``;
v1: 77,509,632 trainable), batches from the real collator on synthetic random-noise line images
(300..640 x 32..48 px: no Gundam tiles, so 273 image tokens as in the issue) with random CJK labels.
A step = host-to-device copy + forward + backward + optimizer step; median of the timed steps after warm-up.
MFU = model FLOPs per second / a bf16 8192^3 matmul measured in the same run. Model FLOPs: frozen vision
forward only; language model 3x forward (the usual 6N-style count; with a frozen base the backward really
does ~1x, so this matches how the issue counts 1.85 TFLOP per Gundam sample).

Writes ``DIR/benchmark.json`` and ``DIR/benchmark.md``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collator.deepseek_ocr import DeepSeekOCRDataCollator
from dsocr.models import get_family

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "<image>\nFree OCR."
V1_LORA_COUNT = 77_509_632


# ============================================================================================ helpers
def log(msg: str) -> None:
    """Print a timestamped progress line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthetic_records(n: int, seed: int, widths=(300, 640), heights=(32, 48)) -> list[dict]:
    """Random-noise line images of realistic sizes with random CJK labels (4..24 characters)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        w, h = rng.randint(*widths), rng.randint(*heights)
        pixels = nrng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        text = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(4, 24)))
        records.append({
            "id": f"synthetic-{i}",
            "messages": [
                {"role": "<|User|>", "content": PROMPT, "images": [Image.fromarray(pixels)]},
                {"role": "<|Assistant|>", "content": text},
            ],
        })
    return records


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset, GiB."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def matmul_tflops(device: torch.device, quick: bool) -> float:
    """Measured dense matmul rate (bf16 8192^3 on CUDA; fp32 512^3 on CPU in quick mode)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 3 if quick else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    return 2 * n**3 / dt / 1e12


def to_device(batch: dict, device: torch.device, pinned_bf16: bool) -> dict:
    """Move a batch to the device (non-blocking when the host tensors are pinned)."""
    return {k: v.to(device, non_blocking=pinned_bf16) if torch.is_tensor(v) else v for k, v in batch.items()}


def prepare_host_batch(batch: dict, pinned_bf16: bool, model_dtype: torch.dtype, cast_pixels: bool = False) -> dict:
    """Optionally cast pixels to the model dtype on the host (halves the copy; v1 casts anyway) and pin."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if (pinned_bf16 or cast_pixels) and k.startswith("pixel_values") and v.is_floating_point():
                v = v.to(model_dtype)
            if pinned_bf16 and torch.cuda.is_available():
                v = v.pin_memory()
        out[k] = v
    return out


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Temporarily change torch's default dtype (fast full-size init directly in bf16)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ============================================================================================ FLOPs
def _linear(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def v1_vision_flops(cfg, side: int) -> float:
    """Forward FLOPs of SAM + compressor + CLIP + projector for one ``side`` x ``side`` view."""
    g = side // cfg.sam_patch_size
    n = g * g
    c = cfg.sam_width
    mlp = int(c * cfg.sam_mlp_ratio)
    f = _linear(n, 3 * cfg.sam_patch_size**2, c)  # patch embed
    win = cfg.sam_window_size
    padded = (math.ceil(g / win) * win) ** 2
    for i in range(cfg.sam_depth):
        toks = n if i in cfg.sam_global_attn_indexes else padded
        f += _linear(toks, c, 3 * c) + _linear(toks, c, c) + _linear(n, c, mlp) + _linear(n, mlp, c)
        span = n if i in cfg.sam_global_attn_indexes else win * win
        f += 4.0 * toks * span * c  # QK^T and PV
    oc = cfg.sam_out_chans
    c2, c3 = cfg.sam_downsample_channels
    f += _linear(n, c, oc) + _linear(n, 9 * oc, oc) + _linear(n / 4, 9 * oc, c2) + _linear(n / 16, 9 * c2, c3)
    m = n / 16 + 1
    w = cfg.clip_width
    f += cfg.clip_layers * (_linear(m, w, 4 * w) + _linear(m, w, 2 * cfg.clip_mlp_dim) + 4.0 * m * m * w)
    f += _linear(n / 16, cfg.projector_input_dim, cfg.hidden_size)
    return f


def lm_forward_flops_per_token(cfg, seq_len: int, r: int = 16) -> float:
    """Decoder forward FLOPs per token (attention linears + scores, dense/MoE MLPs incl. LoRA, router)."""
    h = cfg.hidden_size
    f = 0.0
    for layer in range(cfg.num_hidden_layers):
        f += 4 * (_linear(1, h, h) + _linear(1, h, r) + _linear(1, r, h)) + 4.0 * seq_len * h
        if layer < cfg.first_k_dense_replace:
            widths = [cfg.intermediate_size]
        else:
            widths = [cfg.moe_intermediate_size] * cfg.num_experts_per_tok
            widths += [cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)]
            f += _linear(1, h, cfg.n_routed_experts)
        for i in widths:
            if i:
                f += 3 * _linear(1, h, i) + 2 * (_linear(1, h, r) + _linear(1, r, i)) + _linear(1, i, r) + _linear(1, r, h)
    return f


def v1_batch_flops(cfg, batch: dict) -> float:
    """Model FLOPs of one training step on ``batch`` (vision forward + LM 3x forward + lm_head on labels)."""
    f = 0.0
    f += batch["pixel_values"].shape[0] * v1_vision_flops(cfg, batch["pixel_values"].shape[-1])
    if "pixel_values_local" in batch:
        f += batch["pixel_values_local"].shape[0] * v1_vision_flops(cfg, batch["pixel_values_local"].shape[-1])
    lengths = batch["attention_mask"].sum(1).tolist()
    for n in lengths:
        f += 3 * n * lm_forward_flops_per_token(cfg, n)
    labels = int((batch["labels"][:, 1:] != -100).sum())
    f += 3 * _linear(labels, cfg.hidden_size, cfg.vocab_size)
    return f


def ocr2_batch_flops(model_cfg, batch: dict) -> float:
    """Model FLOPs for OCR-2: SAM at 1024 + compressor, Qwen2-style encoder over patches + queries, LM 3x."""
    sam = model_cfg.vision_config.sam_config
    enc = model_cfg.vision_config.encoder_config
    text = model_cfg.text_config

    class _V:  # reuse the v1 SAM count (same SAM-B) with OCR-2's compressor widths, no CLIP
        sam_patch_size, sam_width, sam_mlp_ratio, sam_window_size = sam.patch_size, sam.hidden_size, sam.mlp_ratio, sam.window_size
        sam_depth, sam_global_attn_indexes, sam_out_chans = sam.num_hidden_layers, sam.global_attn_indexes, sam.output_channels
        sam_downsample_channels = sam.downsample_channels
        clip_layers, clip_width, clip_mlp_dim, projector_input_dim, hidden_size = 0, 1, 1, sam.downsample_channels[-1], text.hidden_size

    f = 0.0
    views = [(batch["pixel_values"].shape[0], batch["pixel_values"].shape[-1])]
    if "pixel_values_local" in batch:
        views.append((batch["pixel_values_local"].shape[0], batch["pixel_values_local"].shape[-1]))
    for count, side in views:
        patches = (side // (sam.patch_size * 4)) ** 2
        toks = 2 * patches  # patches + as many queries
        kv = enc.num_key_value_heads * (enc.hidden_size // enc.num_attention_heads)
        per_layer = (_linear(toks, enc.hidden_size, 2 * enc.hidden_size + 2 * kv) + _linear(toks, enc.hidden_size, 3 * enc.intermediate_size)
                     + 4.0 * toks * toks * enc.hidden_size)
        f += count * (v1_vision_flops(_V, side) + enc.num_hidden_layers * per_layer)

    class _T:
        hidden_size, num_hidden_layers = text.hidden_size, text.num_hidden_layers
        first_k_dense_replace = sum(1 for t in text.mlp_layer_types if t == "dense")
        intermediate_size, moe_intermediate_size = text.intermediate_size, text.moe_intermediate_size
        num_experts_per_tok, n_shared_experts, n_routed_experts = text.num_experts_per_tok, text.n_shared_experts, text.n_routed_experts

    for n in batch["attention_mask"].sum(1).tolist():
        f += 3 * n * lm_forward_flops_per_token(_T, n)
    labels = batch["labels"] if "labels" in batch else batch["shift_labels"]
    f += 3 * _linear(int((labels != -100).sum()), text.hidden_size, text.vocab_size)
    return f


# ============================================================================================ models
def build_v1(device: torch.device, quick: bool):
    """Build full-size (or, quick, tiny) v1 on the device with the pipeline's LoRA; also the trainable count."""
    from peft import LoraConfig, get_peft_model

    from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig
    from dsocr.models.deepseek_ocr_v1.family import tiny_config
    from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM

    family = get_family("deepseek_ocr_v1")
    if quick:
        config, dtype = tiny_config(), torch.float32
    else:
        config, dtype = DeepseekOCRConfig(pad_token_id=2), torch.bfloat16
    config.use_cache = False
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        model = DeepseekOCRForCausalLM(config)
    model.to(device=device, dtype=dtype)
    targets = family.lora_targets(model, LORA_MODULES)
    # The pipeline's LoraConfig (dsocr.loading.add_lora): r=16, alpha=16 (configs/v1_lora_zh.yaml), no dropout.
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", **targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not quick and trainable != V1_LORA_COUNT:
        raise RuntimeError(f"v1 LoRA trainable {trainable:,} != {V1_LORA_COUNT:,}")
    return family, model, trainable


def build_ocr2(device: torch.device, quick: bool, tmp: Path):
    """Full-size OCR-2 with the official checkpoint's sizes (the config class defaults are NOT the official model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    family = get_family("deepseek_ocr2")
    if quick:
        family.make_tiny(tmp / "ocr2_tiny")
        model = family.load_model(str(tmp / "ocr2_tiny"), dtype=torch.float32).to(device)
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
        config = DeepseekOcr2Config(
            image_token_id=128815,
            text_config=dict(
                vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
                num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, mlp_layer_types=["dense"] + ["sparse"] * 11,
                max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            ),
            vision_config=dict(
                sam_config=dict(initializer_range=0.02),
                encoder_config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
            ),
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with default_dtype(dtype), torch.device(device):
            model = DeepseekOcr2ForConditionalGeneration(config)
        model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    targets = family.lora_targets(model, LORA_MODULES)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", **targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return family, model, trainable


def set_v1_knobs(model, moe: str, attn: str, vision_chunk: int | None) -> None:
    """Switch the v1 speed knobs: MoE implementation, attention implementation, views per vision call."""
    base = model.base_model.model
    base.config.moe_implementation = moe
    base.config._attn_implementation = attn  # one config object is shared by every attention module
    base.model.vision_chunk_size = vision_chunk


# ============================================================================================ timing
def count_host_syncs(fn) -> int | None:
    """Blocking host-device syncs during ``fn()`` (CUDA sync debug mode; ``None`` off CUDA)."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def count_kernels(fn) -> int | None:
    """CUDA kernels launched by ``fn()`` (torch profiler; ``None`` off CUDA)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_training(name: str, model, batches: list[dict], device, *, fused_adam: bool, pinned_bf16: bool,
                  warmup: int, steps: int, flops_fn, peak_tflops: float, extra: dict, diagnostics: bool = False,
                  drop_keys=(), cast_pixels: bool = False) -> dict:
    """Time forward + backward + AdamW steps on ``batches``; one result row."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {"lr": 1e-5}
    if fused_adam and device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(params, **opt_kwargs)
    model.train()
    model_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    host = [prepare_host_batch({k: v for k, v in b.items() if k not in drop_keys}, pinned_bf16, model_dtype,
                               cast_pixels) for b in batches]

    def step(i: int) -> torch.Tensor:
        batch = to_device(host[i % len(host)], device, pinned_bf16)
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    reset_peak(device)
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    loss_value = float(loss.detach().float())
    if not math.isfinite(loss_value):
        raise RuntimeError(f"{name}: non-finite loss {loss_value}")
    step_s = statistics.median(times)
    bsz = batches[0]["input_ids"].shape[0]
    tokens = statistics.mean(float(b["attention_mask"].sum()) for b in batches)
    flops = statistics.mean(flops_fn(b) for b in batches)
    row = {
        "config": name, "batch": bsz, "samples_per_s": bsz / step_s, "tokens_per_s": tokens / step_s,
        "step_ms": 1000 * step_s, "step_ms_min": 1000 * min(times), "step_ms_max": 1000 * max(times),
        "peak_gib": peak_gib(device), "tflop_per_sample": flops / bsz / 1e12,
        "mfu": flops / step_s / (peak_tflops * 1e12), "loss": loss_value, "steps_timed": steps,
        "seq_len": batches[0]["input_ids"].shape[1], **extra,
    }
    if diagnostics:
        row["host_syncs_per_step"] = count_host_syncs(lambda: step(0))
        row["cuda_kernels_per_step"] = count_kernels(lambda: step(1))
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    return row


def collate_batches(collator, records: list[dict], batch_size: int, n_batches: int, offset: int = 0) -> tuple[list[dict], float]:
    """Collate ``n_batches`` batches with the real collator; also the collator's samples/s."""
    t0 = time.perf_counter()
    out = []
    for i in range(n_batches):
        start = (offset + i * batch_size) % max(1, len(records) - batch_size + 1)
        out.append(collator(records[start:start + batch_size]))
    dt = time.perf_counter() - t0
    return out, batch_size * n_batches / dt


# ============================================================================================ main
def run(out_dir: Path, quick: bool, only: set[str] | None = None) -> dict:
    """Run every configuration and write ``benchmark.json`` / ``benchmark.md`` to ``out_dir``."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "python": sys.version.split()[0], "quick": quick,
    }
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_tflops(device, quick)
    info["matmul_tflops"] = round(peak, 1)
    log(f"device {info['device']}; matmul {peak:.1f} TFLOP/s")

    from dsocr.models.tokenizer import build_offline_tokenizer

    tokenizer = build_offline_tokenizer()
    records = synthetic_records(12 if quick else 512, seed=0)
    warm, steps = (1, 1) if quick else (3, 8)
    rows: list[dict] = []
    results = {"info": info, "train": rows}

    def want(tag: str) -> bool:
        return only is None or tag in only

    # ------------------------------------------------------------------------------------ v1 training
    if want("v1") or want("eval"):
        family, model, trainable = build_v1(device, quick)
        info["v1_trainable"] = trainable
        base = model.base_model.model
        log(f"v1 built: {trainable:,} trainable")
        cfg = base.config
        collators = {
            mode: DeepSeekOCRDataCollator(tokenizer=tokenizer, family=family,
                                          image_processor=family.image_processor(base, mode),
                                          image_token_id=family.image_token_id(base))
            for mode in ("gundam", "tiny", "small")
        }
        flops_fn = lambda b: v1_batch_flops(cfg, b)  # noqa: E731

        # (name, mode, batch, moe, attn, vision_chunk, pinned_bf16 + fused adam)
        plan = [
            ("v1 baseline: gundam b2 eager, loop experts, vision per image", "gundam", 2, "loop", "eager", 1, False),
            ("+ grouped experts (b2)", "gundam", 2, "grouped", "eager", 1, False),
            ("+ sdpa (b2)", "gundam", 2, "grouped", "sdpa", 1, False),
            ("+ batched vision (b2)", "gundam", 2, "grouped", "sdpa", None, False),
            ("+ pinned bf16 batches, fused AdamW (b2)", "gundam", 2, "grouped", "sdpa", None, True),
            ("gundam b16", "gundam", 16, "grouped", "sdpa", 16, True),
            ("gundam b32", "gundam", 32, "grouped", "sdpa", 16, True),
            ("gundam b64", "gundam", 64, "grouped", "sdpa", 16, True),
            ("tiny b64", "tiny", 64, "grouped", "sdpa", 32, True),
            ("tiny b128", "tiny", 128, "grouped", "sdpa", 32, True),
            ("small b64", "small", 64, "grouped", "sdpa", 32, True),
        ]
        if quick:  # CPU: the baseline, one change and one line-sized mode, tiny batches
            keep = ("v1 baseline", "+ grouped experts", "+ batched vision", "tiny b64")
            plan = [(n, m, min(b, 2), moe, at, vc, pb) for n, m, b, moe, at, vc, pb in plan if n.startswith(keep)]
        collate_rate = {}
        if want("v1"):
            for name, mode, bsz, moe, attn, chunk, fast_io in plan:
                set_v1_knobs(model, moe, attn, chunk)
                batches, rate = collate_batches(collators[mode], records, bsz, 2, offset=bsz)
                collate_rate.setdefault(mode, rate)
                is_diag = name.startswith("v1 baseline") or name == "gundam b32"
                try:
                    row = time_training(name, model, batches, device, fused_adam=fast_io, pinned_bf16=fast_io,
                                        warmup=warm, steps=steps, flops_fn=flops_fn, peak_tflops=peak,
                                        extra={"model": "v1", "mode": mode, "moe": moe, "attn": attn,
                                               "vision_chunk": chunk, "pinned_bf16_fused_adam": fast_io},
                                        diagnostics=is_diag)
                except torch.OutOfMemoryError as exc:  # report, keep going
                    row = {"config": name, "batch": bsz, "error": f"OOM: {str(exc)[:200]}", "model": "v1"}
                    torch.cuda.empty_cache()
                rows.append(row)
                log(_fmt_row(row, rows[0]))
            info["collator_samples_per_s_one_process"] = {k: round(v, 1) for k, v in collate_rate.items()}

        # -------------------------------------------------------------------------------- eval speed
        if want("eval"):
            set_v1_knobs(model, "grouped", "sdpa", 32)
            # Random weights must generate until max_new_tokens in both runs: make EOS and PAD never win the
            # greedy argmax (their lm_head rows give logit 0, below the max over 129k random logits).
            with torch.no_grad():
                head = base.lm_head.weight
                head[tokenizer.eos_token_id].zero_()
                head[tokenizer.pad_token_id].zero_()
            results["eval"] = {}
            for mode in ("gundam", "tiny"):
                results["eval"][mode] = eval_speed(model, collators[mode], records, device, quick)
                log(f"eval {mode}: {results['eval'][mode]}")
        del model, base
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------ OCR-2
    if want("ocr2"):
        family2, model2, trainable2 = build_ocr2(device, quick, out_dir)
        info["ocr2_trainable"] = trainable2
        log(f"ocr2 built: {trainable2:,} trainable")
        base2 = model2.base_model.model
        ours = DeepSeekOCRDataCollator(tokenizer=tokenizer, family=family2,
                                       image_processor=family2.image_processor(base2, "gundam"),
                                       image_token_id=family2.image_token_id(base2),
                                       supervised_logits_only=family2.supports_logits_to_keep)
        flops2 = lambda b: ocr2_batch_flops(base2.config, b)  # noqa: E731
        for bsz in ([2] if quick else [32]):
            batches, _ = collate_batches(ours, records, bsz, 2)
            for name, drop, fast_io in (
                (f"ocr2 plain transformers b{bsz} (full logits, HF loss)", ("logits_to_keep", "shift_labels"), False),
                (f"ocr2 our pipeline b{bsz} (supervised logits)", (), True),
            ):
                try:
                    row = time_training(name, model2, batches, device, fused_adam=fast_io, pinned_bf16=fast_io,
                                        warmup=warm, steps=steps, flops_fn=flops2, peak_tflops=peak,
                                        extra={"model": "ocr2", "mode": "gundam"}, drop_keys=drop,
                                        cast_pixels=True)  # transformers' OCR-2 does not cast pixels itself
                except torch.OutOfMemoryError as exc:
                    row = {"config": name, "batch": bsz, "error": f"OOM: {str(exc)[:200]}", "model": "ocr2"}
                    torch.cuda.empty_cache()
                rows.append(row)
                log(_fmt_row(row, None))
        del model2

    info["wall_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    md = render_markdown(results)
    (out_dir / "benchmark.md").write_text(md)
    print(md, flush=True)
    return results


def eval_speed(model, collator, records, device, quick: bool) -> dict:
    """Batched greedy generation of N lines vs one line at a time (same model, same max_new_tokens)."""
    from dsocr.generation import GenerationSettings, generate_batched

    n_all = 4 if quick else 512
    n_single = 2 if quick else 24
    big = 4 if quick else 128
    new_tokens = 4 if quick else 16
    lines = records[:n_all]
    # Warm-up (kernels, allocator) for both shapes.
    generate_batched(model, collator, lines[:big], GenerationSettings(batch_size=big, max_new_tokens=2), device, progress=False)
    generate_batched(model, collator, lines[:2], GenerationSettings(batch_size=1, max_new_tokens=2), device, progress=False)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    batched = generate_batched(model, collator, lines, GenerationSettings(batch_size=big, max_new_tokens=new_tokens),
                               device, progress=False)
    sync(device)
    t_batched = time.perf_counter() - t0
    peak_batched = peak_gib(device)
    t0 = time.perf_counter()
    single = generate_batched(model, collator, lines[:n_single], GenerationSettings(batch_size=1, max_new_tokens=new_tokens),
                              device, progress=False)
    sync(device)
    t_single = time.perf_counter() - t0
    rate_b, rate_s = len(lines) / t_batched, n_single / t_single
    t0 = time.perf_counter()
    for start in range(0, len(lines), big):
        collator.generation_batch(lines[start:start + big]) if hasattr(collator, "generation_batch") else None
    t_collate = time.perf_counter() - t0
    return {
        "lines": len(lines), "batch_size": big, "max_new_tokens": new_tokens,
        "batched_s": round(t_batched, 2), "host_preprocessing_s_of_512": round(t_collate, 2), "batched_lines_per_s": round(rate_b, 2), "batched_peak_gib": peak_batched,
        "mean_new_tokens_batched": round(statistics.mean(r["new_tokens"] for r in batched), 2),
        "single_lines_timed": n_single, "single_s": round(t_single, 2), "single_lines_per_s": round(rate_s, 3),
        "mean_new_tokens_single": round(statistics.mean(r["new_tokens"] for r in single), 2),
        "single_512_lines_est_s": round(len(lines) / rate_s, 1), "speedup": round(rate_b / rate_s, 1),
        "same_hypotheses_on_common_lines": sum(
            a["hypothesis"] == b["hypothesis"] for a, b in zip(batched[:n_single], single)) ,
    }


def _fmt_row(row: dict, base: dict | None) -> str:
    if "error" in row:
        return f"{row['config']}: {row['error']}"
    ratio = f" x{row['samples_per_s'] / base['samples_per_s']:.1f} vs baseline" if base and "samples_per_s" in base else ""
    diag = ""
    if "host_syncs_per_step" in row:
        diag = f"; host syncs/step {row['host_syncs_per_step']}, CUDA kernels/step {row['cuda_kernels_per_step']}"
    return (f"{row['config']}: {row['samples_per_s']:.2f} samples/s, {row['tokens_per_s']:.0f} tokens/s, "
            f"{row['step_ms']:.0f} ms/step, peak {row['peak_gib']} GiB, MFU {100 * row['mfu']:.1f}%{ratio}{diag}")


def render_markdown(results: dict) -> str:
    """The results as a markdown table plus the OCR-2 and evaluation lines."""
    info = results["info"]
    rows = results["train"]
    base = next((r for r in rows if r.get("config", "").startswith("v1 baseline") and "samples_per_s" in r), None)
    lines = [
        f"# Benchmark ({'QUICK, tiny models on CPU' if info['quick'] else 'full-size models, random weights'})",
        "",
        f"device: **{info['device']}**; torch {info['torch']}, transformers {info['transformers']}; "
        f"bf16 matmul {info['matmul_tflops']} TFLOP/s (measured in this run); wall {info.get('wall_s')} s",
        f"v1 trainable {info.get('v1_trainable', '-'):,}" if isinstance(info.get("v1_trainable"), int) else "",
        "",
        "| config | batch | samples/s | tokens/s | step ms | peak GiB | TFLOP/sample | MFU | x baseline | syncs/step | kernels/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['batch']} | {r['error']} | | | | | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.1f}" if base and r.get("model") == "v1" else "-"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['step_ms']:.0f} "
            f"| {r['peak_gib']} | {r['tflop_per_sample']:.3f} | {100 * r['mfu']:.1f}% | {ratio} "
            f"| {r.get('host_syncs_per_step', '')} | {r.get('cuda_kernels_per_step', '')} |"
        )
    ocr2 = [r for r in rows if r.get("model") == "ocr2" and "samples_per_s" in r]
    if len(ocr2) == 2:
        lines += ["", f"OCR-2 our pipeline / plain transformers: x{ocr2[1]['samples_per_s'] / ocr2[0]['samples_per_s']:.2f}"]
    for mode, ev in (results.get("eval") or {}).items():
        lines += [
            "",
            f"Eval v1 {mode} (greedy, max_new_tokens {ev['max_new_tokens']}, mean new tokens {ev['mean_new_tokens_batched']}"
            f"/{ev['mean_new_tokens_single']}): batched {ev['lines']} lines at batch {ev['batch_size']}: "
            f"{ev['batched_lines_per_s']} lines/s ({ev['batched_s']} s, of which host preprocessing alone takes "
            f"~{ev['host_preprocessing_s_of_512']} s; peak {ev['batched_peak_gib']} GiB); one line at a time: "
            f"{ev['single_lines_per_s']} lines/s (timed on {ev['single_lines_timed']} lines; 512 lines "
            f"~{ev['single_512_lines_est_s']} s) -> **x{ev['speedup']}**",
        ]
    if info.get("collator_samples_per_s_one_process"):
        lines += ["", f"collator (one CPU process) samples/s: {info['collator_samples_per_s_one_process']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for benchmark.json / benchmark.md")
    ap.add_argument("--quick", action="store_true", help="tiny models on CPU, seconds (debugging / CI)")
    ap.add_argument("--only", default=None, help="comma list of v1,eval,ocr2 (default: all)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    run(args.out, args.quick, only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
