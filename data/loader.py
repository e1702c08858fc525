"""Load one split of a text-line dataset, whatever its storage, as ``id`` / ``image`` / ``text`` rows.

One call, :func:`load_split`, for every supported ``source``. Images are **never decoded here** (the
reference train split has 400,000 rows): the ``image`` column is ``datasets.Image(decode=False)``, i.e. a
``{"bytes": ..., "path": ...}`` dict per row, decoded later by ``data.images.open_image``.

| format | ``source`` | files | example record |
|---|---|---|---|
| hub dataset | ``priyank-m/chinese_text_recognition`` | on the hub; splits ``train``/``val``/``test`` | ``{"image": <JPEG>, "text": "就当选为代表，在立法"}`` |
| local parquet folder (same layout; ``python -m data.generate`` writes it) | ``runs/synth`` | ``runs/synth/data/{split}-00000-of-00001*.parquet`` | same as the hub |
| JSONL manifest, path template | ``manifests/{split}.jsonl`` | one JSON object per line | ``{"image": "imgs/0001.png", "text": "合计￥12.50", "id": "r1"}`` |
| JSONL manifest, folder | ``manifests`` | ``manifests/{split}.jsonl`` | same |
| image folder (``imagefolder`` layout) | ``scans`` | ``scans/{split}/metadata.jsonl`` or ``.csv`` (or ``scans/metadata.*`` = split ``train``) + the images | ``{"file_name": "0001.png", "text": "2024年5月3日"}`` |

Rules:

* ``id``: the record's own ``id`` column/key if present, else ``f"{split}-{index}"`` (index = position in the
  split, before ``max_samples``), so ids are stable across runs and match ``python -m data.check`` reports.
* Parquet/hub ``image`` columns holding path strings (instead of ``Image()``) resolve against ``image_root``.
* Manifest image paths: absolute paths are kept; relative ones resolve against ``image_root`` if given,
  else against the manifest file's folder. Imagefolder ``file_name`` resolves against the metadata file's
  folder (or ``image_root``). A missing file is a per-record error (``missing_image_file``) raised when the
  image is opened, so ``python -m data.check`` lists every one.
* The image root: ``image_root`` if given, else the manifest's / metadata file's folder. An image path whose
  resolved location (``os.path.realpath``: ``..`` and symlinks count, absolute paths too) is not inside the
  root is a structural problem, reason ``path_outside_root``: a manifest line such as ``../../etc/passwd``
  must not make training read arbitrary files. Parquet/hub path columns are held to ``image_root`` when it
  is set (without it they have no root and are kept as written). ``allow_paths_outside_root=True``
  (``--allow-paths-outside-root``, ``data.allow_paths_outside_root``) switches the check off.
* ``column_map`` maps **our** names to **yours**: ``{"image": "img", "text": "label"}`` (CLI:
  ``--column-map image=img,text=label``); keys allowed: ``image``, ``text``, ``id``.
* ``max_samples`` keeps the first N rows (debugging).
* A parquet/hub ``tags`` column (``python -m data.domains`` / ``data.hardset`` write one: a struct of
  ``domain``, ``level``, ``degradations``, ``length`` strings) is kept as a fourth column; evaluation
  reports metrics per tag value from it. Sources without it load as before.
* Whole-source problems (unknown split, missing source, a parquet/hub split lacking a column) always raise
  :class:`DataSourceError`. Per-line structural problems (a manifest/metadata line that is not a JSON
  object (``bad_json``) or lacks a key (``missing_column``), a non-string label (``label_not_string``), an
  image path outside the root (``path_outside_root``)) raise one :class:`DataSourceError` listing all of
  them at once, so training stops; with ``problems=[]`` they are appended to that list instead as
  ``{"id", "reason", "message"}`` dicts and the good lines still load (``python -m data.check`` uses this
  to report them together with the image/label problems in one pass). Value problems (empty label,
  corrupt image) are per record (``data.images.BadRecordError``), raised when the record is decoded.

The hub id needs network access; offline it raises :class:`DataSourceError` (reason ``hub_unreachable``)
explaining how to point ``source`` at a local copy.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import datasets

OUR_COLUMNS = ("image", "text")
TAGS = "tags"  # optional per-line tags column (data.domains, data.hardset), kept when present
MAPPABLE = ("image", "text", "id")
MANIFEST_SUFFIX = ".jsonl"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class DataSourceError(ValueError):
    """A whole source or split cannot be loaded (as opposed to one bad record).

    Attributes:
        reason: Short code: ``source_not_found``, ``hub_unreachable``, ``unknown_split``, ``missing_column``,
            ``bad_json``, ``label_not_string``, ``path_outside_root``, ``bad_column_map``, ``bad_max_samples``.
        problems: Per-record details ``{"id", "reason", "message"}`` when the problem is in specific lines
            (manifest/metadata lines, rows of a path column); empty otherwise.
    """

    def __init__(self, reason: str, message: str, problems: list[dict[str, str]] | None = None):
        """Build the error."""
        self.reason = reason
        self.problems = problems or []
        super().__init__(f"{reason}: {message}")


def _resolve_map(column_map: dict[str, str] | None) -> dict[str, str]:
    """Return {our name: user's name} for image/text/id, validating the keys."""
    column_map = dict(column_map or {})
    unknown = sorted(set(column_map) - set(MAPPABLE))
    if unknown:
        raise DataSourceError(
            "bad_column_map",
            f"column_map keys {unknown} are not ours; keys must be among {list(MAPPABLE)} and values your "
            "column names, e.g. {'image': 'img', 'text': 'label'} (CLI: --column-map image=img,text=label).",
        )
    return {name: column_map.get(name, name) for name in MAPPABLE}


def _finish(rows: dict[str, list[Any]], max_samples: int | None) -> datasets.Dataset:
    """Build the output dataset from id/image/text lists (image = path strings or bytes dicts)."""
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(decode=False),
            "text": datasets.Value("string"),
        }
    )
    if max_samples is not None:
        rows = {k: v[:max_samples] for k, v in rows.items()}
    # Path strings are stored as {"bytes": None, "path": p}: nothing is read here, a missing file surfaces
    # later as a per-record error.
    return datasets.Dataset.from_dict(rows, features=features)


def _read_records(path: str) -> list[tuple[str, Any]]:
    """Read a JSONL (or metadata CSV) file as (location, parsed object) pairs."""
    out: list[tuple[str, Any]] = []
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                out.append((f"{path}:{i}", row))
        return out
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"{path}:{i}", e))
    return out


def _outside_root(path: str, real_root: str) -> str | None:
    """Return ``path``'s resolved location if it is not inside ``real_root`` (already resolved), else None."""
    real = os.path.realpath(path)
    try:
        inside = os.path.commonpath([real, real_root]) == real_root
    except ValueError:  # different drives (Windows): certainly not inside
        inside = False
    return None if inside else real


def _outside_problem(rid: str, where: str, given: str, real: str, real_root: str) -> dict[str, str]:
    """The ``path_outside_root`` problem for one record."""
    return {
        "id": rid,
        "reason": "path_outside_root",
        "message": f"{where}: image path {given!r} resolves to {real!r}, outside the image root "
        f"{real_root!r}; set image_root to a folder that contains it, or allow_paths_outside_root "
        "(--allow-paths-outside-root, data.allow_paths_outside_root) if such paths are intended.",
    }


def _report(problems: list[dict[str, str]], what: str, problems_out: list[dict[str, Any]] | None) -> None:
    """Append per-line problems to ``problems_out``, or raise them all at once when it is None."""
    if not problems:
        return
    if problems_out is not None:
        problems_out.extend(problems)
        return
    listing = "\n".join(f"  {p['id']}: {p['reason']}: {p['message']}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise DataSourceError(
        problems[0]["reason"],
        f"{len(problems)} malformed record(s) in {what}:\n{listing}{more}\n"
        "List every problem of the split (these and the image/label ones) with `python -m data.check`.",
        problems,
    )


def _from_records(
    path: str,
    split: str,
    cmap: dict[str, str],
    image_key: str,
    base: str,
    max_samples: int | None,
    allow_outside: bool,
    problems_out: list[dict[str, Any]] | None,
) -> datasets.Dataset:
    """Turn manifest/metadata records into the output dataset, reporting structural problems together."""
    ids, images, texts, problems = [], [], [], []
    real_root = os.path.realpath(base)
    records = _read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    for index, (where, rec) in enumerate(records):
        rid = f"{split}-{index}"
        if isinstance(rec, json.JSONDecodeError):
            problems.append({"id": rid, "reason": "bad_json", "message": f"{where}: not valid JSON ({rec})"})
            continue
        if not isinstance(rec, dict):
            problems.append(
                {
                    "id": rid,
                    "reason": "bad_json",
                    "message": f"{where}: expected a JSON object, got {type(rec).__name__}",
                }
            )
            continue
        if cmap["id"] in rec and rec[cmap["id"]] is not None:
            rid = str(rec[cmap["id"]])
        missing = [k for k in (image_key, cmap["text"]) if k not in rec]
        if missing:
            problems.append(
                {
                    "id": rid,
                    "reason": "missing_column",
                    "message": f"{where}: missing key(s) {missing}; keys present: {sorted(rec)}. "
                    "Map yours with column_map, e.g. --column-map image=img,text=label.",
                }
            )
            continue
        text = rec[cmap["text"]]
        if text is not None and not isinstance(text, str):
            # Arrow would silently cast 123 to "123": refuse instead, the label type is a data bug.
            problems.append(
                {
                    "id": rid,
                    "reason": "label_not_string",
                    "message": f"{where}: label {text!r:.60} is a {type(text).__name__}, not a string",
                }
            )
            continue
        given = img = rec[image_key]
        if isinstance(img, str) and img and not os.path.isabs(img):
            img = os.path.join(base, img)
        elif not isinstance(img, str):
            img = None if img is None else str(img)
        # Whatever became a path is held to the root (a number 5 would be opened as "./5").
        if img and not allow_outside:
            real = _outside_root(img, real_root)
            if real is not None:
                problems.append(_outside_problem(rid, where, given, real, real_root))
                continue
        ids.append(rid)
        images.append(img or None)
        texts.append(text)
    _report(problems, path, problems_out)
    return _finish({"id": ids, "image": images, "text": texts}, None)


def _split_files(folder: str, pattern: str) -> dict[str, str]:
    """Map split name -> file for ``folder/{split}.jsonl`` style layouts."""
    return {
        name[: -len(pattern)]: os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.endswith(pattern) and os.path.isfile(os.path.join(folder, name))
    }


def _unknown_split(split: str, available: list[str], source: str) -> DataSourceError:
    return DataSourceError(
        "unknown_split", f"split {split!r} not found in {source!r}; available splits: {sorted(available)}."
    )


def _load_manifest(
    source: str,
    split: str,
    cmap: dict[str, str],
    image_root: str | None,
    max_samples: int | None,
    allow_outside: bool,
    problems_out: list[dict[str, Any]] | None,
):
    """JSONL manifest: a ``{split}`` path template or a folder of ``{split}.jsonl`` files."""
    if "{split}" in source:
        path = source.format(split=split)
        if not os.path.isfile(path):
            folder = os.path.dirname(source) or "."
            prefix, suffix = os.path.basename(source).split("{split}", 1)
            avail = []
            if os.path.isdir(folder):
                avail = [
                    n[len(prefix) : len(n) - len(suffix)]
                    for n in os.listdir(folder)
                    if n.startswith(prefix) and n.endswith(suffix)
                ]
            if avail:
                raise _unknown_split(split, avail, source)
            raise DataSourceError("source_not_found", f"manifest {path!r} (from {source!r}) does not exist.")
    else:
        files = _split_files(source, MANIFEST_SUFFIX)
        if split not in files:
            raise _unknown_split(split, list(files), source)
        path = files[split]
    base = image_root or os.path.dirname(os.path.abspath(path))
    return _from_records(path, split, cmap, cmap["image"], base, max_samples, allow_outside, problems_out)


def _imagefolder_files(source: str) -> dict[str, str]:
    """Map split -> metadata file for the imagefolder layout (top-level metadata = split ``train``)."""
    found: dict[str, str] = {}
    for meta in METADATA_FILES:
        if os.path.isfile(os.path.join(source, meta)):
            found.setdefault("train", os.path.join(source, meta))
    for name in sorted(os.listdir(source)):
        sub = os.path.join(source, name)
        if os.path.isdir(sub):
            for meta in METADATA_FILES:
                if os.path.isfile(os.path.join(sub, meta)):
                    found.setdefault(name, os.path.join(sub, meta))
    return found


def _load_hf(
    source: str,
    split: str,
    cmap: dict[str, str],
    image_root: str | None,
    max_samples: int | None,
    is_local: bool,
    allow_outside: bool,
    problems_out: list[dict[str, Any]] | None,
) -> datasets.Dataset:
    """Hub id or local folder in the hub's parquet layout: the same ``load_dataset(source)`` call."""
    try:
        dsd = datasets.load_dataset(source)
    except (ConnectionError, TimeoutError) as e:
        raise DataSourceError(
            "hub_unreachable",
            f"cannot reach the Hugging Face hub for {source!r} ({e}). Point source at a local copy instead: "
            "a folder holding data/{train,val,test}-00000-of-00001*.parquet (e.g. `huggingface-cli download "
            f"{source} --repo-type dataset --local-dir DIR` on a connected machine, then source=DIR), or "
            "generate a synthetic one with `python -m data.generate --out DIR`.",
        ) from e
    except FileNotFoundError as e:
        kind = "local folder" if is_local else "hub dataset"
        raise DataSourceError("source_not_found", f"{kind} {source!r} could not be loaded ({e}).") from e
    if split not in dsd:
        raise _unknown_split(split, list(dsd), source)
    ds = dsd[split]
    cols = ds.column_names
    missing = [f"{ours}->{cmap[ours]!r}" for ours in OUR_COLUMNS if cmap[ours] not in cols]
    if missing:
        raise DataSourceError(
            "missing_column",
            f"{source!r} split {split!r} lacks column(s) {missing}; columns present: {cols}. "
            "Map yours with column_map, e.g. {'image': 'img', 'text': 'label'} (--column-map image=img,text=label).",
        )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    keep = [cmap["image"], cmap["text"]] + ([cmap["id"]] if cmap["id"] in cols else [])
    keep += [TAGS] if TAGS in cols and TAGS not in keep else []  # per-line tags travel with the rows
    ds = ds.select_columns(keep)
    if cmap["image"] != "image":
        ds = ds.rename_column(cmap["image"], "image")
    if cmap["text"] != "text":
        ds = ds.rename_column(cmap["text"], "text")
    # Ids before any row is refused, so they keep their position in the split.
    if cmap["id"] in cols:
        if cmap["id"] != "id":
            ds = ds.rename_column(cmap["id"], "id")
        if ds.features["id"] != datasets.Value("string"):
            ds = ds.cast_column("id", datasets.Value("string"))
    else:
        ds = ds.add_column("id", [f"{split}-{i}" for i in range(len(ds))])
    if ds.features["image"] == datasets.Value("string"):
        # A column of paths: resolve relative ones against image_root, then store as {"bytes": None, "path"}.
        if image_root is not None:
            # Plain lists, not ds.map: a cached map result would skip the function and with it the check.
            given = ds["image"]
            resolved = [p if not p or os.path.isabs(p) else os.path.join(image_root, p) for p in given]
            ds = ds.remove_columns("image").add_column("image", resolved)
            if not allow_outside:
                real_root = os.path.realpath(image_root)
                problems, keep = [], []
                for i, (rid, p, full) in enumerate(zip(ds["id"], given, resolved)):
                    real = _outside_root(full, real_root) if p else None
                    if real is None:
                        keep.append(i)
                    else:
                        where = f"{source!r} split {split!r} row {i}"
                        problems.append(_outside_problem(rid, where, p, real, real_root))
                _report(problems, f"{source!r} split {split!r}", problems_out)
                if problems:
                    ds = ds.select(keep)
        ds = ds.cast_column("image", datasets.Image(decode=False))
    elif isinstance(ds.features["image"], datasets.Image):
        # Metadata-only change: rows become {"bytes", "path"} dicts, decoded later one at a time.
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds.select_columns(["id", "image", "text"] + ([TAGS] if TAGS in ds.column_names else []))


def load_split(
    source: str,
    split: str,
    *,
    column_map: dict[str, str] | None = None,
    image_root: str | None = None,
    max_samples: int | None = None,
    allow_paths_outside_root: bool = False,
    problems: list | None = None,
) -> datasets.Dataset:
    """Load one split as a ``datasets.Dataset`` with columns ``id``, ``image`` (undecoded), ``text``.

    See the module docstring for the formats and rules.

    Args:
        source: Hub dataset id, local parquet folder, manifest template (``.../{split}.jsonl``), manifest
            folder, or imagefolder folder.
        split: Split name, e.g. ``train``, ``val``, ``test``.
        column_map: ``{our name: your column}`` for ``image``/``text``/``id``.
        image_root: Folder that relative image paths resolve against (manifest and imagefolder formats,
            parquet/hub path columns); also the root image paths must stay inside.
        max_samples: Keep only the first N rows.
        allow_paths_outside_root: Accept image paths that resolve outside the image root (``..``,
            absolute paths, symlinks) instead of refusing them as ``path_outside_root``.
        problems: ``None`` (training): per-line structural problems raise. A list (``python -m
            data.check``): they are appended to it as ``{"id", "reason", "message"}`` dicts and the other
            lines still load.

    Returns:
        The split; ``image`` values are ``{"bytes": ..., "path": ...}`` dicts (``datasets.Image(decode=False)``).

    Raises:
        DataSourceError: Missing source, hub unreachable, unknown split, missing columns; malformed
            manifest/metadata lines or paths outside the root when ``problems`` is None.
    """
    cmap = _resolve_map(column_map)
    if max_samples is not None and max_samples < 1:
        raise DataSourceError("bad_max_samples", f"max_samples must be >= 1 or None, got {max_samples!r}.")
    if image_root is not None and not os.path.isdir(image_root):
        raise DataSourceError("source_not_found", f"image_root {image_root!r} is not a folder.")
    checks = (allow_paths_outside_root, problems)
    if "{split}" in source:
        return _load_manifest(source, split, cmap, image_root, max_samples, *checks)
    if os.path.isdir(source):
        if _split_files(source, MANIFEST_SUFFIX):
            return _load_manifest(source, split, cmap, image_root, max_samples, *checks)
        meta = _imagefolder_files(source)
        if meta:
            if split not in meta:
                raise _unknown_split(split, list(meta), source)
            path = meta[split]
            base = image_root or os.path.dirname(path)
            key = cmap["image"] if cmap["image"] != "image" else "file_name"
            return _from_records(path, split, cmap, key, base, max_samples, *checks)
        return _load_hf(source, split, cmap, image_root, max_samples, True, *checks)
    if os.path.exists(source):
        raise DataSourceError(
            "source_not_found",
            f"{source!r} is a file; pass a folder, a hub id, or a manifest template with a {{split}} placeholder "
            f"(e.g. {os.path.join(os.path.dirname(source) or '.', '{split}.jsonl')!r}).",
        )
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a mistyped local path.
    looks_local = (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or source.endswith((".jsonl", ".parquet", ".csv"))
    )
    if looks_local:
        raise DataSourceError(
            "source_not_found",
            f"{source!r} does not exist (not a folder, not a manifest template, and not an 'owner/name' hub id).",
        )
    return _load_hf(source, split, cmap, image_root, max_samples, False, *checks)
