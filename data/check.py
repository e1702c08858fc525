"""Scan a dataset split and report every bad record, before a training run meets it.

Run::

    python -m data.check priyank-m/chinese_text_recognition --split val
    python -m data.check manifests/{split}.jsonl --split train --image-root /data/imgs --out bad.jsonl
    python -m data.check my_folder --column-map image=img,text=label --max-samples 1000

Every image is decoded through ``data.images.open_image`` and every label checked with
``data.images.validate_text``: the exact code the training path uses, so a clean report means training will
not meet a bad record. Converted-but-fine inputs (CMYK, 16-bit, RGBA, palette, greyscale, EXIF-rotated) are
not errors. Structural problems (missing columns, malformed manifest lines) are reported too.

Output: one line per bad record (``id  reason  message``), then counts per reason. ``--out FILE.jsonl``
writes one JSON object per bad record (``id``, ``reason``, ``message``). Exit status: 0 if clean, 1 if any
bad record, 2 if the source itself cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from data.images import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_LABEL_CHARS,
    BadRecordError,
    ImageLimits,
    open_image,
    validate_text,
)
from data.loader import DataSourceError, load_split


def parse_column_map(spec: str | None) -> dict[str, str] | None:
    """Parse ``image=img,text=label`` into ``{"image": "img", "text": "label"}``.

    Args:
        spec: The CLI value, or ``None``.

    Returns:
        The mapping, or ``None`` when ``spec`` is empty.

    Raises:
        ValueError: An item is not ``ours=theirs``.
    """
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(
                f"--column-map item {item!r} is not ours=theirs; e.g. --column-map image=img,text=label"
            )
        out[key.strip()] = value.strip()
    return out


def scan(
    source: str,
    split: str = "train",
    *,
    column_map: dict[str, str] | None = None,
    image_root: str | None = None,
    max_samples: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
) -> dict[str, Any]:
    """Check every record of one split.

    Args:
        source: As for ``data.loader.load_split``.
        split: Split name.
        column_map: ``{our name: your column}``.
        image_root: Folder for relative image paths.
        max_samples: Check only the first N records.
        limits: Image limits.
        max_label_chars: Label length limit.

    Returns:
        ``{"total", "ok", "bad": [{"id", "reason", "message"}, ...], "counts": {reason: n}}``.

    Raises:
        DataSourceError: The source, split or columns cannot be loaded at all (its ``problems`` lists
            malformed manifest lines when there are some).
    """
    ds = load_split(source, split, column_map=column_map, image_root=image_root, max_samples=max_samples)
    bad: list[dict[str, str]] = []
    for i, rec in enumerate(ds):
        rid = rec["id"]
        # Both checks on every record: a record with a bad label AND a bad image is reported twice.
        try:
            validate_text(rec["text"], record_id=rid, max_chars=max_label_chars)
        except BadRecordError as e:
            bad.append(e.to_dict())
        try:
            open_image(rec["image"], record_id=rid, limits=limits)
        except BadRecordError as e:
            bad.append(e.to_dict())
        if (i + 1) % 50000 == 0:
            print(f"  checked {i + 1}/{len(ds)} records, {len(bad)} problems so far", file=sys.stderr)
    return {
        "total": len(ds),
        "ok": len(ds) - len({b["id"] for b in bad}),
        "bad": bad,
        "counts": dict(Counter(b["reason"] for b in bad)),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring. Returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m data.check", description="Report every bad record of a dataset split."
    )
    p.add_argument(
        "source",
        help="hub id, parquet folder, manifest template ('.../{split}.jsonl') or folder, imagefolder",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--column-map", default=None, help="ours=theirs pairs, e.g. image=img,text=label")
    p.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels)
    p.add_argument("--min-side", type=int, default=DEFAULT_LIMITS.min_side)
    p.add_argument("--max-aspect", type=float, default=DEFAULT_LIMITS.max_aspect)
    p.add_argument("--max-label-chars", type=int, default=DEFAULT_MAX_LABEL_CHARS)
    p.add_argument("--out", default=None, help="write the bad records as JSONL here")
    a = p.parse_args(argv)
    try:
        cmap = parse_column_map(a.column_map)
    except ValueError as e:
        p.error(str(e))
    limits = ImageLimits(max_pixels=a.max_pixels, min_side=a.min_side, max_aspect=a.max_aspect)
    try:
        report = scan(
            a.source,
            a.split,
            column_map=cmap,
            image_root=a.image_root,
            max_samples=a.max_samples,
            limits=limits,
            max_label_chars=a.max_label_chars,
        )
    except DataSourceError as e:
        # The split cannot be loaded at all; manifest line problems are still listed one by one.
        print(f"ERROR: {e}", file=sys.stderr)
        bad = e.problems or [{"id": "*", "reason": e.reason, "message": str(e)}]
        if a.out:
            _write(a.out, bad)
        return 2
    for b in report["bad"]:
        print(f"{b['id']}\t{b['reason']}\t{b['message']}")
    if a.out:
        _write(a.out, report["bad"])
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(report["counts"].items())) or "none"
    print(
        f"checked {report['total']} records of {a.source!r} split {a.split!r}: {report['ok']} ok, "
        f"{report['total'] - report['ok']} bad ({counts})"
    )
    return 1 if report["bad"] else 0


def _write(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
