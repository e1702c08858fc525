"""Corpus perplexity of a base model or LoRA checkpoint on a split: exp(total target NLL / target tokens).

    python eval/eval_ppl.py --ckpt runs/v1_lora_zh/checkpoint-1500
    python eval/eval_ppl.py --ckpt deepseek-ai/DeepSeek-OCR --config configs/v1_lora_zh.yaml eval.max_samples=2000

Targets are what training supervises: the transcription tokens and EOS (never the prompt or image
slots). Every batch contributes its *summed* NLL, so the figure does not depend on batch size.
Writes ``perplexity.json`` next to the CER outputs (``<ckpt>/eval-<split>/`` or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    """Compute and write the perplexity; returns the metrics dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or base model")
    p.add_argument("--config", help="run config (required for a base model)")
    p.add_argument("--out", help="output folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.max_samples=200")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from dsocr.checkpoints import is_checkpoint
    from dsocr.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg is None and not is_checkpoint(args.ckpt):
        raise SystemExit(f"error: --ckpt {args.ckpt!r} is not a checkpoint of this pipeline; pass --config FILE too")

    from dsocr.datasets import load_eval_records
    from dsocr.devices import default_device
    from dsocr.generation import corpus_nll
    from dsocr.loading import load_for_eval
    from dsocr.metrics import perplexity

    device = default_device()
    loaded = load_for_eval(args.ckpt, cfg=None if is_checkpoint(args.ckpt) else cfg, overrides=args.overrides, device=device)
    cfg = loaded.cfg
    collator = loaded.make_collator(train=True)  # train layout: prompt + answer + EOS, labels on the answer
    records = load_eval_records(cfg)
    start = time.perf_counter()
    total, tokens = corpus_nll(loaded.model, collator, records, cfg.eval.batch_size, device, progress=True)
    metrics = {"perplexity": perplexity(total, tokens), "total_nll": total, "target_tokens": tokens,
               "lines": len(records), "split": cfg.eval.split, "dataset": cfg.data.dataset, "ckpt": str(args.ckpt),
               "seconds": round(time.perf_counter() - start, 3)}
    out = Path(args.out) if args.out else (Path(args.ckpt) / f"eval-{cfg.eval.split}" if is_checkpoint(args.ckpt)
                                           else Path("runs") / "eval" / Path(args.ckpt).name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"perplexity {metrics['perplexity']:.4f} over {tokens} target tokens of {len(records)} lines -> {out}")
    return metrics


if __name__ == "__main__":
    main()
