r"""Transcribe images, folders, globs and PDFs with a base model, a LoRA checkpoint or an exported model.

    python infer/predict.py --ckpt runs/v1_lora_zh/final receipts/ --out predictions.jsonl
    python infer/predict.py --ckpt exports/v1-zh scan.png 'pages/*.jpg' contract.pdf --txt-dir texts/
    python infer/predict.py --ckpt deepseek-ai/DeepSeek-OCR report.pdf --prompt document --image-mode gundam

``--ckpt`` is anything ``eval/eval_cer.py`` takes, plus a folder written by ``infer/export.py``. Inputs are
image files, folders (recursively: image and PDF files), globs and PDF files (every page rasterised at
``--pdf-dpi``). Images are decoded by the training data's decoder with the model's run limits.

Prompt and image mode default to what the model was trained with (its ``run_config.yaml``); ``--prompt
line`` / ``--prompt document`` pick the official line / whole-page prompts, any other text is used as
given. Generation is the evaluation's (greedy, batched, the no-repeat-n-gram guard), so a line gets the
same text here as in ``eval/eval_cer.py`` at the same ``--max-new-tokens``.

Output: JSONL (``--out FILE``, default standard output), one row per image or PDF page, in input order::

    {"path": "scans/a.png", "page": null, "text": "合计:¥12.50", "seconds": 0.031,
     "confidence": {"mean": 0.97, "min": 0.81}, "new_tokens": 9}

(``confidence``: the mean and minimum probability of the answer's tokens; ``seconds``: wall time per image
of its batch window), or one ``.txt`` per input (``--txt-dir``; PDF pages separated by a form feed). A bad
file or page prints one line on standard error (which file, why), gets an ``{"path", "page", "error",
"message"}`` row, and the rest is still predicted; the exit code is 1 when any input failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: ``--ckpt`` and inputs, output choice, batch size, prompt, image mode, limits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="LoRA checkpoint, exported folder, or base model id/folder")
    p.add_argument("inputs", nargs="+", help="image files, folders, globs or PDF files")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", help="JSONL file to write (default: standard output)")
    out.add_argument("--txt-dir", help="write one .txt per input into this folder instead")
    p.add_argument("--batch-size", type=int, help="images per generate() call (default: eval.batch_size of the run)")
    p.add_argument("--prompt", help="line, document, or the instruction text with <image> (default: as trained)")
    p.add_argument("--image-mode", help="preprocessing mode, e.g. tiny or gundam for v1 (default: as trained)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: see dsocr.inference.load_predictor)")
    p.add_argument("--pdf-dpi", type=int, default=None, help="PDF render resolution (default 200)")
    p.add_argument("--config", help="run config YAML for a base model (limits, eval settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _txt_name(path: str, used: set[str]) -> str:
    """``scan.png`` -> ``scan.txt``; a second ``scan.*`` gets ``scan.png.txt``, then a counter."""
    stem, name = Path(path).stem, Path(path).name
    for candidate in (f"{stem}.txt", f"{name}.txt", *(f"{name}.{i}.txt" for i in range(2, 10_000))):
        if candidate not in used:
            used.add(candidate)
            return candidate
    raise RuntimeError(f"no free .txt name for {path!r}")


def main(argv: list[str] | None = None) -> int:
    """Predict every input; returns the exit code (0: all predicted, 1: some inputs failed)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from tqdm.auto import tqdm

    from dsocr.checkpoints import CheckpointError
    from dsocr.config import ConfigError
    from dsocr.inference import load_predictor, predict_inputs
    from dsocr.inputs import expand_inputs

    # ---------------------------------------------------------------- inputs first: a typo fails in a second
    files, input_errors = expand_inputs(args.inputs)
    for error in input_errors:
        print(f"error: {error.line()}", file=sys.stderr)
    if not files:
        print("error: no input to predict (see above)", file=sys.stderr)
        return 1

    # ---------------------------------------------------------------- model, with the settings it was trained with
    start = time.perf_counter()
    try:
        predictor = load_predictor(args.ckpt, config=args.config, prompt=args.prompt, image_mode=args.image_mode,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (CheckpointError, ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    log.info("%s; loaded in %.1f s; %d files", predictor.describe(), time.perf_counter() - start, len(files))

    # ---------------------------------------------------------------- predict and write, in input order
    rows = [{"path": e.path, "page": e.page, "error": e.reason, "message": e.line()} for e in input_errors]
    sink = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 - closed below
    failed, done, pages = len(input_errors), 0, {}
    start = time.perf_counter()
    try:
        for row in rows:
            if not args.txt_dir:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        for row in predict_inputs(predictor, files, pdf_dpi=args.pdf_dpi, progress=not args.quiet):
            if "error" in row:
                failed += 1
                tqdm.write(f"error: {row['message']}", file=sys.stderr)
            else:
                done += 1
            if args.txt_dir:
                pages.setdefault(row["path"], []).append(row)
            else:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
    finally:
        if args.out:
            sink.close()
    seconds = time.perf_counter() - start
    if args.txt_dir:
        # One text file per input: PDF pages joined by a form feed (the page break of plain-text files).
        folder = Path(args.txt_dir)
        folder.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for path, page_rows in pages.items():
            if all("error" in r for r in page_rows) and page_rows[0]["page"] is None:
                continue  # a file that could not be read at all gets no .txt
            text = "\n\f\n".join(r.get("text", "") for r in page_rows)
            (folder / _txt_name(path, used)).write_text(text + "\n", encoding="utf-8")
    where = args.out or args.txt_dir or "standard output"
    print(f"predicted {done} images/pages in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f}/s) -> {where}; "
          f"{failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
