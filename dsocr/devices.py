"""Where a model runs and in which dtype."""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` = bfloat16 on a CUDA device that supports it, else float32 (CPU bf16 is slow and lossy)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":  # cards without bf16 (T4, V100): training needs fp16 autocast + loss scaling
        return torch.float16
    on_cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda")
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory in GiB (None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point weights (the first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def batch_to(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """Move a collated batch to ``device``; floating tensors (pixels) also to ``dtype`` when given.

    The collator emits float32 pixels. Inside the Trainer, autocast reconciles them with bf16 weights; in
    evaluation and prediction there is no autocast, so they must arrive in the weights' dtype (a bf16
    model's first convolution refuses float32 input).
    """
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
