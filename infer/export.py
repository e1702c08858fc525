r"""Merge a LoRA checkpoint into a standalone model folder in the official layout (or export the adapter).

    python infer/export.py --ckpt runs/v1_lora_zh/checkpoint-5000 --out exports/v1-zh            # bf16, merged
    python infer/export.py --ckpt runs/tiny_cpu/final --out exports/tiny --dtype float32 --force
    python infer/export.py --ckpt runs/v1_lora_zh/final --out exports/v1-zh-lora --adapter-only
    python infer/export.py --ckpt runs/x/final --out exports/x --base /models/DeepSeek-OCR        # base moved

The merged folder loads with ``from_pretrained`` exactly like the base model (and in vLLM for v1): the
base's ``config.json`` byte for byte, safetensors in the base checkpoint's key layout with the LoRA merged
into every weight (sharded with an index above ``--max-shard-size``), the tokenizer files, the run config
and a model card (``README.md``: base, data, recipe, metrics, image mode and what it means for serving).
``--adapter-only`` writes a plain PEFT adapter restricted to the language model instead.

Refused before any model loads, with the fix: an incomplete checkpoint, an adapter trained on another base
than ``--base``, an existing non-empty ``--out`` (without ``--force``), too little free disk space.
docs/EXPORT.md describes the layout.
"""

from __future__ import annotations

import argparse
import logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--ckpt``, ``--out``, ``--dtype``, ``--adapter-only``, ``--force``, ``--base``, ``--max-shard-size``, ``--device``."""
    from dsocr.export import DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="LoRA checkpoint folder (runs/<run>/checkpoint-N or final)")
    p.add_argument("--out", required=True, help="folder to write (created; refused if it exists, unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=EXPORT_DTYPES, help="weights dtype (default bfloat16)")
    p.add_argument("--adapter-only", action="store_true", help="write a plain PEFT adapter (language model only)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--base", help="the base model expected (hub id or folder); default: the one the run names")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"largest weights file before sharding with an index (default {DEFAULT_MAX_SHARD_SIZE})")
    p.add_argument("--device", default="cpu", help="where the merge runs: cpu (default) or cuda")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Export one checkpoint; returns the output folder. Exits with the reason on a refused export."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dsocr.checkpoints import CheckpointError
    from dsocr.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, adapter_only=args.adapter_only,
                                force=args.force, base=args.base, max_shard_size=args.max_shard_size,
                                device=args.device)
    except (ExportError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(out)
    return str(out)


if __name__ == "__main__":
    main()
