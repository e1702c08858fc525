"""Scan a dataset split and report every bad record, before a training run meets it.

Run::

    python -m data.check priyank-m/chinese_text_recognition --split val
    python -m data.check manifests/{split}.jsonl --split train --image-root /data/imgs --out bad.jsonl
    python -m data.check my_folder --column-map image=img,text=label --max-samples 1000
    python -m data.check --config configs/tiny_cpu.yaml --split train

Every image is decoded through ``data.images.open_image`` and every label checked with
``data.images.validate_text``: the exact code the training path uses, so a clean report means training will
not meet a bad record. Converted-but-fine inputs (CMYK, 16-bit, RGBA, palette, greyscale, EXIF-rotated) are
not errors. Per-line structural problems of manifests/metadata files (``bad_json``, ``missing_column``,
``label_not_string``, ``path_outside_root``) are reported in the same pass as the image and label problems
(``data.loader.load_split(problems=[...])``), so one run lists everything.

``--config RUN.yaml`` reads the run config's ``data:`` block (the same file training takes) and checks with
exactly training's settings: ``dataset`` (the source, when none is given on the command line),
``column_map``, ``image_root``, ``max_label_chars``, ``max_image_pixels``, ``min_image_side``,
``max_image_aspect`` and ``allow_paths_outside_root``. Relative paths resolve against the current folder,
as in training. Flags given explicitly on the command line win over the config; the config's other keys
(``train_split``, ``on_bad_record``...) are training's and are not read here.

Output: one line per problem (``id  reason  message``; the structural ones first), then counts per reason.
``--out FILE.jsonl`` writes one JSON object per problem (``id``, ``reason``, ``message``). Exit status: 0 if
clean, 1 if any bad record, 2 if the source itself cannot be loaded (missing source, unknown split, a
parquet/hub split lacking a column) or the command line / config is invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any

import yaml

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


# The run config's data: keys this tool reads -> the type training's schema (dsocr/config.py) gives them.
CONFIG_KEYS = {
    "dataset": str,
    "column_map": dict,
    "image_root": str,
    "max_label_chars": int,
    "max_image_pixels": int,
    "min_image_side": int,
    "max_image_aspect": float,
    "allow_paths_outside_root": bool,
}
_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _config_value(path: str, key: str, value: Any) -> Any:
    """Check one ``data.<key>`` value, converting it the way training's config loader does."""
    kind = CONFIG_KEYS[key]
    where = f"{path}: data.{key}"
    if key == "image_root" and value is None:
        return None
    if kind is str and isinstance(value, str):
        return value
    if kind is int and not isinstance(value, bool):
        # Training's loader (OmegaConf) also takes integers written as strings ("512").
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    if kind is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            # Plain YAML 1.1 reads 1e2 as a string; training's loader reads it as a float: follow training.
            try:
                return float(value)
            except ValueError:
                pass
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
    if kind is dict and isinstance(value, dict):
        if all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        raise ValueError(
            f"{where} {value!r} must map our names to your column names, all strings, "
            "e.g. column_map: {image: img, text: label}."
        )
    expected = {
        str: "a string" + (" or null" if key == "image_root" else ""),
        int: "an integer, e.g. 512",
        float: "a number, e.g. 100.0",
        bool: "true or false",
        dict: "a mapping, e.g. column_map: {image: img, text: label}",
    }[kind]
    raise ValueError(
        f"{where} is {value!r} ({type(value).__name__}); it must be {expected}. Fix it in the config."
    )


def read_config(path: str) -> dict[str, Any]:
    """Read the settings ``python -m data.check`` uses from a run config's ``data:`` block.

    Plain YAML is enough for these keys; ``dsocr.config`` is not imported (``data`` is the lowest layer).
    Values are converted as training's loader converts them (``"512"`` -> 512, ``1e2`` -> 100.0).

    Args:
        path: The run YAML (e.g. ``configs/tiny_cpu.yaml``).

    Returns:
        ``{key: value}`` for the keys of :data:`CONFIG_KEYS` that the ``data:`` block sets.

    Raises:
        ValueError: The file is missing, not YAML, not a mapping, or a value has the wrong type; the
            message names the file, the key and the value.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"config file {path!r} does not exist; pass --config path/to/run.yaml (e.g. configs/tiny_cpu.yaml)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML ({e}); fix the syntax.") from e
    if not isinstance(raw, dict):
        raise ValueError(
            f"config file {path!r}: the top level must be a mapping of keys, got {type(raw).__name__}."
        )
    block = raw.get("data") or {}
    if not isinstance(block, dict):
        raise ValueError(f"config file {path!r}: data must be a mapping of keys, got {type(block).__name__}.")
    return {key: _config_value(path, key, block[key]) for key in CONFIG_KEYS if key in block}


def scan(
    source: str,
    split: str = "train",
    *,
    column_map: dict[str, str] | None = None,
    image_root: str | None = None,
    max_samples: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
    allow_paths_outside_root: bool = False,
) -> dict[str, Any]:
    """Check every record of one split, structural problems included, in one pass.

    Args:
        source: As for ``data.loader.load_split``.
        split: Split name.
        column_map: ``{our name: your column}``.
        image_root: Folder for relative image paths (and the root they must stay inside).
        max_samples: Check only the first N records.
        limits: Image limits.
        max_label_chars: Label length limit.
        allow_paths_outside_root: Accept image paths outside the image root.

    Returns:
        ``{"total", "ok", "bad": [{"id", "reason", "message"}, ...], "counts": {reason: n}}``; ``bad``
        lists the structural problems (malformed lines, paths outside the root) first, then the image
        and label problems; ``total`` counts the malformed lines too.

    Raises:
        DataSourceError: The source, split or columns cannot be loaded at all.
    """
    structural: list[dict[str, str]] = []
    ds = load_split(
        source,
        split,
        column_map=column_map,
        image_root=image_root,
        max_samples=max_samples,
        allow_paths_outside_root=allow_paths_outside_root,
        problems=structural,
    )
    bad: list[dict[str, str]] = list(structural)
    bad_rows = 0  # counted by row, not by id: two records may share an id
    for i, rec in enumerate(ds):
        rid = rec["id"]
        before = len(bad)
        # Both checks on every record: a record with a bad label AND a bad image is reported twice.
        try:
            validate_text(rec["text"], record_id=rid, max_chars=max_label_chars)
        except BadRecordError as e:
            bad.append(e.to_dict())
        try:
            open_image(rec["image"], record_id=rid, limits=limits)
        except BadRecordError as e:
            bad.append(e.to_dict())
        bad_rows += len(bad) > before
        if (i + 1) % 50000 == 0:
            print(f"  checked {i + 1}/{len(ds)} records, {len(bad)} problems so far", file=sys.stderr)
    return {
        "total": len(ds) + len(structural),
        "ok": len(ds) - bad_rows,
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
        nargs="?",
        default=None,
        help="hub id, parquet folder, manifest template ('.../{split}.jsonl') or folder, imagefolder "
        "(default with --config: its data.dataset)",
    )
    p.add_argument("--config", default=None, help="run YAML whose data: block gives the source and limits")
    p.add_argument("--split", default="train")
    # None = not given: the config's value (or the default) applies; a flag given explicitly wins.
    p.add_argument("--column-map", default=None, help="ours=theirs pairs, e.g. image=img,text=label")
    p.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None, help=f"default {DEFAULT_LIMITS.max_pixels}")
    p.add_argument("--min-side", type=int, default=None, help=f"default {DEFAULT_LIMITS.min_side}")
    p.add_argument("--max-aspect", type=float, default=None, help=f"default {DEFAULT_LIMITS.max_aspect:g}")
    p.add_argument("--max-label-chars", type=int, default=None, help=f"default {DEFAULT_MAX_LABEL_CHARS}")
    p.add_argument(
        "--allow-paths-outside-root",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="accept image paths that resolve outside the image root (default: refuse them)",
    )
    p.add_argument("--out", default=None, help="write the bad records as JSONL here")
    a = p.parse_args(argv)
    cfg: dict[str, Any] = {}
    if a.config is not None:
        try:
            cfg = read_config(a.config)
        except ValueError as e:
            p.error(str(e))
    source = a.source if a.source is not None else cfg.get("dataset")
    if source is None:
        p.error(
            f"no data.dataset in {a.config!r}; give a source or set data.dataset there."
            if a.config is not None
            else "give a source (hub id, folder or manifest template) or --config RUN.yaml with data.dataset."
        )
    try:
        cmap = parse_column_map(a.column_map) if a.column_map is not None else cfg.get("column_map")
    except ValueError as e:
        p.error(str(e))

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else cfg.get(key, default)

    limits = ImageLimits(
        max_pixels=pick(a.max_pixels, "max_image_pixels", DEFAULT_LIMITS.max_pixels),
        min_side=pick(a.min_side, "min_image_side", DEFAULT_LIMITS.min_side),
        max_aspect=pick(a.max_aspect, "max_image_aspect", DEFAULT_LIMITS.max_aspect),
    )
    try:
        report = scan(
            source,
            a.split,
            column_map=cmap,
            image_root=pick(a.image_root, "image_root", None),
            max_samples=a.max_samples,
            limits=limits,
            max_label_chars=pick(a.max_label_chars, "max_label_chars", DEFAULT_MAX_LABEL_CHARS),
            allow_paths_outside_root=pick(a.allow_paths_outside_root, "allow_paths_outside_root", False),
        )
    except DataSourceError as e:
        # The split cannot be loaded at all (per-line problems never get here: scan collects them).
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
        f"checked {report['total']} records of {source!r} split {a.split!r}: {report['ok']} ok, "
        f"{report['total'] - report['ok']} bad ({counts})"
    )
    return 1 if report["bad"] else 0


def _write(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
