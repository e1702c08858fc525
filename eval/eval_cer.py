r"""Character error rate of one or several models on a split, with batched greedy generation.

    python eval/eval_cer.py --ckpt runs/v1_lora_zh/checkpoint-1500            # self-describing checkpoint
    python eval/eval_cer.py --ckpt deepseek-ai/DeepSeek-OCR --config configs/v1_lora_zh.yaml   # base model
    python eval/eval_cer.py --ckpt BASE --ckpt runs/x/checkpoint-500 --ckpt runs/x/final \\
        --config configs/tiny_cpu.yaml --out runs/compare                     # comparison report
    python eval/eval_cer.py --ckpt runs/x/final --peer tesseract --peer rapidocr   # + peer engines
    python -m data.hardset --out runs/hardset                                 # the hard set (per-tag metrics)
    python eval/eval_cer.py --ckpt runs/x/final data.dataset=runs/hardset eval.split=test eval.max_samples=null
    python eval/eval_cer.py --peer rapidocr --peer tesseract --config configs/tiny_cpu.yaml \
        data.dataset=runs/hardset eval.split=test --out runs/peers_hardset      # peers alone need --config

A ``--ckpt`` is a LoRA checkpoint of this pipeline (its ``run_config.yaml`` says everything) or a base
model id/folder (then ``--config`` supplies data and eval settings). With several, every model is
scored on the same lines: data and eval settings come from ``--config`` or else the first checkpoint.
``key=value`` arguments override those settings (e.g. ``eval.max_samples=200 eval.batch_size=32``).

Writes per model ``<out>/<name>/metrics.json`` (CER raw and normalised, line accuracy, NED, S/D/I,
per-line CER mean/median, error kinds, confusion pairs, counts, speed) and ``predictions.jsonl``
(id, reference, hypothesis, edits, error kinds, confidence_mean/confidence_min: the mean and minimum
probability of the greedy answer's tokens), and with several models ``<out>/report.md`` + PNGs. When the
dataset has a ``tags`` column (``data.domains``, ``data.hardset``), ``metrics.json`` gains ``by_tag``
(CER, line accuracy and error kinds per domain, level, degradation and length bucket), also written as
``metrics_by_tag.json`` and printed as a table; each prediction line carries its ``tags``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("eval_cer")


def parse_args(argv: list[str] | None = None):
    """``--ckpt`` (repeatable), ``--config``, ``--out``, ``--peer`` and ``key=value`` overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[],
                   help="checkpoint folder or base model (repeatable; may be left out when --peer is given)")
    p.add_argument("--config", help="run config for base models / shared data settings")
    p.add_argument("--out", help="output folder (default: <ckpt>/eval-<split> for one checkpoint)")
    p.add_argument("--name", action="append", help="display name per --ckpt (default: folder names)")
    p.add_argument("--peer", action="append", default=[], choices=["tesseract", "rapidocr"],
                   help="also score a peer OCR engine on the same lines (optional extra)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.max_samples=200")
    args = p.parse_args(argv)
    if args.name and len(args.name) != len(args.ckpt):
        p.error(f"--name given {len(args.name)} times for {len(args.ckpt)} --ckpt")
    if not args.ckpt and not args.peer:
        p.error("give at least one --ckpt (or --peer ENGINE with --config to score peers alone)")
    if not args.ckpt and not args.config:
        p.error("--peer without --ckpt needs --config FILE for the data and eval settings, e.g. "
                "--config configs/tiny_cpu.yaml data.dataset=runs/hardset eval.split=test")
    return args


def _display_names(ckpts: list[str], names: list[str] | None) -> list[str]:
    if names:
        return names
    out = []
    for c in ckpts:
        parts = Path(c).parts
        out.append("_".join(parts[-2:]) if len(parts) >= 2 and parts[-1].startswith(("checkpoint-", "final")) else parts[-1])
    seen: dict[str, int] = {}
    for i, n in enumerate(out):  # make names unique: they are folder names
        if n in seen:
            out[i] = f"{n}_{i}"
        seen[n] = i
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, Chinese kept readable."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def print_tag_table(name: str, by_tag: dict) -> None:
    """One console block per tag key: value, lines, CER norm, line accuracy norm, most frequent error kind."""
    for key, values in by_tag.items():
        print(f"{name} by {key}:")
        for value, m in values.items():
            kinds = {k: v for k, v in m["error_kinds"].items() if v}
            top = max(kinds, key=kinds.get) if kinds else "-"
            print(f"  {value:<14} {m['n_lines']:>5} lines  CER {m['cer_norm']:.4f}  line acc {m['line_acc_norm']:.4f}"
                  f"  top error kind {top}")


def score_and_write(name: str, preds: list[dict], cfg, out_dir: Path, extra: dict,
                    instruction: str | None = None, tags: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """Score predictions, write ``metrics.json`` + ``predictions.jsonl``; return (corpus, per-line).

    ``instruction`` is the prompt the model was given (a prompt echo is an error kind); default the
    config's. ``tags`` (record id -> tag dict, :func:`dsocr.datasets.load_eval_tags`) adds per-tag metrics:
    ``corpus["by_tag"]``, ``metrics_by_tag.json``, a ``tags`` field per prediction line and a console table.
    """
    from dsocr.metrics import NormalizeConfig, metrics_by_tag, score_lines

    ev = cfg.eval
    corpus, per_line = score_lines(
        [p["reference"] for p in preds], [p["hypothesis"] for p in preds],
        normalize_cfg=NormalizeConfig(nfkc=ev.nfkc, remove_whitespace=ev.remove_whitespace, lowercase=ev.lowercase),
        prompt_phrases=(instruction or cfg.collator.instruction,),
    )
    for p, line in zip(preds, per_line):
        line["id"] = p["id"]
        if "new_tokens" in p:
            line["new_tokens"] = p["new_tokens"]
        for key in ("confidence_mean", "confidence_min"):  # the greedy answer's token probabilities
            if key in p:
                line[key] = p[key]
    corpus.update(extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tags:
        line_tags = [tags.get(p["id"]) for p in preds]
        for line, t in zip(per_line, line_tags):
            line["tags"] = t
        corpus["by_tag"] = metrics_by_tag(per_line, line_tags)
        (out_dir / "metrics_by_tag.json").write_text(json.dumps(corpus["by_tag"], ensure_ascii=False, indent=2),
                                                     encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(corpus, ensure_ascii=False, indent=2), encoding="utf-8")
    write_jsonl(out_dir / "predictions.jsonl", [{"id": pl["id"], **{k: v for k, v in pl.items() if k != "id"}} for pl in per_line])
    print(f"{name}: CER {corpus['cer_raw']:.4f} (norm {corpus['cer_norm']:.4f}), line acc {corpus['line_acc_raw']:.4f}, "
          f"NED {corpus['ned_norm']:.4f}, {corpus['n_lines']} lines, loops {corpus['error_kinds']['repetition_loop']}, "
          f"{extra.get('lines_per_s', 0):.1f} lines/s -> {out_dir}")
    if tags:
        print_tag_table(name, corpus["by_tag"])
    return corpus, per_line


def main(argv: list[str] | None = None) -> dict:
    """Evaluate every ``--ckpt`` on the same lines; returns ``{name: corpus metrics}``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dsocr.checkpoints import CheckpointError, checkpoint_problem, is_checkpoint
    from dsocr.config import ConfigError, load_config, load_saved_config

    # ------------------------------------------------ every --ckpt checked before anything loads
    problems = [p for c in args.ckpt if (p := checkpoint_problem(c)) is not None]
    if problems:  # all of them at once: a typo in the third --ckpt should not cost two evaluations
        raise SystemExit("error: " + "\nerror: ".join(problems))

    # ------------------------------------------------ the shared data/eval settings
    try:
        if args.config:
            shared = load_config(args.config, args.overrides)
        elif is_checkpoint(args.ckpt[0]):
            shared = load_saved_config(args.ckpt[0], args.overrides)
        else:
            raise SystemExit(
                f"error: --ckpt {args.ckpt[0]!r} is a base model (no adapter_config.json + run_config.yaml), "
                "which carries no data or eval settings. To fix: also pass --config FILE, e.g. "
                "--config configs/v1_lora_zh.yaml"
            )
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None

    import torch

    from dsocr.datasets import load_eval_records, load_eval_tags
    from dsocr.devices import default_device
    from dsocr.generation import GenerationSettings, generate_batched, max_new_tokens_for
    from dsocr.loading import load_for_eval

    device = default_device()
    # Records per instruction: every checkpoint is prompted the way it was trained (its run_config.yaml),
    # the others with the shared config's. Same lines, same order, whatever the prompt.
    records_by_prompt = {shared.collator.instruction: load_eval_records(shared)}
    records = records_by_prompt[shared.collator.instruction]
    if not records:
        raise SystemExit(f"error: split {shared.eval.split!r} of {shared.data.dataset!r} has no usable records")
    tags = load_eval_tags(shared)  # None unless the dataset has a tags column
    names = _display_names(args.ckpt, args.name)
    if args.out:
        out_root = Path(args.out)
    elif len(args.ckpt) == 1 and is_checkpoint(args.ckpt[0]):
        out_root = Path(args.ckpt[0]) / f"eval-{shared.eval.split}"
    else:
        out_root = Path("runs") / "eval" / "_vs_".join(names + args.peer)
    single = len(args.ckpt) == 1 and not args.peer

    results = []
    for ckpt, name in zip(args.ckpt, names):
        # ---------------------------------------------- model: one shared loading path
        base_cfg = None if is_checkpoint(ckpt) else load_config(args.config, args.overrides) if args.config else None
        try:
            loaded = load_for_eval(ckpt, cfg=base_cfg, overrides=args.overrides, device=device)
        except (CheckpointError, ConfigError) as e:  # e.g. an adapter trained on another base model
            raise SystemExit(f"error: {e}") from None
        family, model, mode = loaded.family, loaded.model, loaded.image_mode
        instruction = loaded.cfg.collator.instruction
        if instruction not in records_by_prompt:
            log.info("%s was trained with the instruction %r (not the shared %r): prompting it with its own",
                     name, instruction, shared.collator.instruction)
            records_by_prompt[instruction] = load_eval_records(shared, instruction=instruction)
        records = records_by_prompt[instruction]
        collator = loaded.make_collator(train=False)
        ev = shared.eval
        settings = GenerationSettings(
            batch_size=ev.batch_size, no_repeat_ngram_size=ev.no_repeat_ngram_size, num_workers=ev.num_workers,
            max_new_tokens=max_new_tokens_for(loaded.tokenizer, [r["messages"][1]["content"] for r in records], ev.max_new_tokens),
        )
        # ---------------------------------------------- generate and score
        start = time.perf_counter()
        timings: dict[str, float] = {}
        preds = generate_batched(model, collator, records, settings, device, timings=timings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = {"name": name, "ckpt": str(ckpt), "family": family.name, "image_mode": mode, "instruction": instruction,
                 "split": ev.split, "dataset": shared.data.dataset, "batch_size": settings.batch_size,
                 "max_new_tokens": settings.max_new_tokens, "no_repeat_ngram_size": settings.no_repeat_ngram_size,
                 "seconds": round(seconds, 3), "lines_per_s": len(preds) / seconds, "device": str(device),
                 "timings": timings}
        out_dir = out_root if single else out_root / name
        corpus, per_line = score_and_write(name, preds, shared, out_dir, extra, instruction=instruction,
                                             tags=tags)
        results.append((name, corpus, per_line))
        del loaded, model
    # ---------------------------------------------- peers on the same lines (optional extra)
    records = records_by_prompt[shared.collator.instruction]
    for engine in args.peer:
        from dsocr.peers import recognize_lines

        images = [r["messages"][0]["images"][0] for r in records]
        start = time.perf_counter()
        hyps = recognize_lines(engine, images)
        seconds = time.perf_counter() - start
        preds = [{"id": r["id"], "reference": r["messages"][1]["content"], "hypothesis": h} for r, h in zip(records, hyps)]
        extra = {"name": engine, "ckpt": f"peer:{engine}", "seconds": round(seconds, 3), "lines_per_s": len(preds) / seconds}
        results.append((engine, *score_and_write(engine, preds, shared, out_root / engine, extra, tags=tags)))
    # ---------------------------------------------- comparison report
    if len(results) > 1:
        from dsocr.report import write_comparison_report

        report = write_comparison_report(results, out_root)
        print(f"comparison report: {report}")
    return {name: corpus for name, corpus, _ in results}


if __name__ == "__main__":
    main()
