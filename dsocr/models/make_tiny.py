"""Write a tiny random-weight model of a family, loadable like a hub checkpoint (tests, CPU demo).

    python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --out runs/tiny_models/deepseek_ocr_v1
    python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --demo --out runs/tiny_models/deepseek_ocr_v1_demo
    python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --full-size --out /tmp/v1_full   # GPU, speed tests

The model is built from the real classes with shrunken sizes and saved with ``save_pretrained`` next
to the real tokenizer (built offline), so the pipeline loads it through the same ``from_pretrained``
path as ``deepseek-ai/DeepSeek-OCR``. Existing folders are left alone unless ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsocr.models import FAMILY_NAMES, get_family


def make_tiny(family: str, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Create (or reuse) the tiny model folder ``out`` for ``family``; returns its path.

    The caller's global RNG state is left as it was: the families seed and draw the random weights
    with the global generator, and a test that seeds, then builds its config (which makes the tiny
    model on first use in a session), would otherwise draw its LoRA matrices from a state that depends
    on which test ran first (two "identical" runs starting from different adapters).
    """
    import torch

    out = Path(out)
    if (out / "config.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # CPU and every visible GPU, restored on exit
        get_family(family).make_tiny(out, seed=seed)
    return out


# The demo's tiny v1 (``--demo``): ``tiny_config`` with these fields changed; the tests keep ``tiny_config``.
# Why wider: the output head has 129,280 random rows, and a hidden state of width H can only spread its
# probability over about H / 20 tokens before random rows outscore them (the random logits have a spread of
# ``row_norm``, an aligned row ``row_norm * sqrt(H)``). Until the model reads the image it must hedge over
# the ~100 two-digit number tokens, and with H = 256 it cannot (the loss stalls near 5 nats per token).
# Attention keeps 4 heads of 64 (head_dim is set explicitly: tiny_config derived it from 256 already).
DEMO_V1_GEOMETRY = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "head_dim": 64}


def make_demo_v1(out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """The CPU demo's tiny random v1: ``tiny_config`` with ``DEMO_V1_GEOMETRY``, the real tokenizer."""
    import torch

    from dsocr.models.base import scale_tiny_output_head
    from dsocr.models.deepseek_ocr_v1.family import tiny_config
    from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM
    from dsocr.models.tokenizer import build_offline_tokenizer

    out = Path(out)
    if (out / "config.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    for key, value in DEMO_V1_GEOMETRY.items():
        setattr(config, key, value)
    with torch.random.fork_rng():  # as make_tiny: the caller's RNG state is left alone
        torch.manual_seed(seed)
        model = DeepseekOCRForCausalLM(config)
        scale_tiny_output_head(model, seed=seed)
    model.save_pretrained(out)
    build_offline_tokenizer().save_pretrained(out)
    return out


def make_full_size_v1(out: str | Path, device: str = "cuda", seed: int = 0, force: bool = False) -> Path:
    """A full-size DeepSeek-OCR v1 (3.34 B parameters, the official config) with random bf16 weights.

    For speed and memory measurements on a machine without the hub: speed depends on shapes, not values.
    Built directly on ``device`` (a CPU build takes minutes), saved like the hub checkpoint with the offline
    tokenizer, so ``from_pretrained`` loads it through the pipeline's own path.
    """
    import torch

    from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig
    from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM
    from dsocr.models.tokenizer import build_offline_tokenizer

    out = Path(out)
    if (out / "config.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = DeepseekOCRForCausalLM(DeepseekOCRConfig(pad_token_id=2, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    build_offline_tokenizer().save_pretrained(out)
    (out / "RANDOM_FULL_SIZE_MODEL.json").write_text('{"note": "random weights, official shapes: for speed tests"}')
    del model
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=FAMILY_NAMES)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")
    p.add_argument("--full-size", action="store_true",
                   help="deepseek_ocr_v1 only: the official 3.34 B shapes with random weights (speed tests)")
    p.add_argument("--device", default="cuda", help="where --full-size builds the model")
    p.add_argument("--demo", action="store_true",
                   help="deepseek_ocr_v1 only: the CPU demo's geometry (DEMO_V1_GEOMETRY), not the tests' one")
    a = p.parse_args(argv)
    if a.demo:
        if a.family != "deepseek_ocr_v1" or a.full_size:
            p.error("--demo is available for --family deepseek_ocr_v1, without --full-size")
        print(make_demo_v1(a.out, a.seed, a.force))
        return
    if a.full_size:
        if a.family != "deepseek_ocr_v1":
            p.error("--full-size is available for --family deepseek_ocr_v1")
        print(make_full_size_v1(a.out, a.device, a.seed, a.force))
        return
    print(make_tiny(a.family, a.out, a.seed, a.force))


if __name__ == "__main__":
    main()
