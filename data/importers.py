"""Import users' own labels (PaddleOCR, Label Studio, CSV) into the hub dataset's parquet layout.

Run::

    python -m data.importers paddle rec_gt_train.txt --out runs/mine --split train            # image_path<TAB>label
    python -m data.importers labelstudio export.json --out runs/mine --split val --image-root ~/.local/share/label-studio/media
    python -m data.importers csv labels.csv --out runs/mine --split test --image-column file --text-column label

Then ``data.dataset: runs/mine`` in a run config (or ``python -m data.check runs/mine --split train``).

| format | input | one record |
|---|---|---|
| ``paddle`` | PaddleOCR recognition label file: ``image_path<TAB>label`` per line, paths relative to ``--image-root`` (default: the label file's folder, PaddleOCR's ``data_dir``) | ``train/word_001.jpg	合计￥12.50`` |
| ``labelstudio`` | Label Studio JSON export of the OCR template (``Rectangle``/``Polygon`` + per-region ``TextArea``): each region with a transcription becomes one line crop; a task whose transcription has no region is the whole image | ``{"id": 7, "data": {"ocr": "/data/upload/1/a.jpg"}, "annotations": [{"result": [{"id": "r1", "type": "textarea", "value": {"x": 10, "y": 20, "width": 50, "height": 8, "rotation": 0, "text": ["合计"]}}]}]}`` |
| ``csv`` | a CSV file with a header; ``--image-column``, ``--text-column``, optional ``--id-column``, ``--delimiter`` (UTF-8, a BOM is fine) | ``file,label`` / ``imgs/1.png,2024年5月3日`` |

Output: ``OUT/data/{split}-00000-of-00001.parquet`` with columns ``id``, ``image`` (embedded bytes: the file
as it is for ``paddle``/``csv``, a PNG crop for ``labelstudio`` regions) and ``text``, i.e. what
``python -m data.generate`` writes plus ids, so ``data.loader.load_split(OUT, split)`` reads it like the hub
set. Other splits already in ``OUT/data`` are left alone. ``OUT/import-{split}.json`` records the command,
the counts and every bad record.

Bad records, the loader's rules: every image is decoded with ``data.images.open_image`` and every label
checked with ``data.images.validate_text`` (reasons ``missing_image_file``, ``corrupt_image``,
``empty_label``, ``too_small`` ...); paths resolving outside the image root are ``path_outside_root``
(``--allow-paths-outside-root`` to accept them); format problems have their own reasons: ``bad_line`` (a
Paddle line without a tab), ``missing_column`` (a CSV row lacking the image/label value),
``no_annotation`` (a Label Studio task with no usable annotation), ``remote_image`` (an http/s3 URL: we do
not download), ``bad_region`` (a box outside the image or of zero size), ``multiline_label`` (a region
with several transcription lines). Each one is printed as ``id  where  reason  message``. By default
(``--on-bad-record error``) nothing is written when there is one and the exit status is 1; with
``--on-bad-record skip`` the good records are written and the bad ones are listed (never dropped
silently). Exit 2: the input itself cannot be read (missing file, not JSON, CSV without the columns).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from data.images import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_LABEL_CHARS,
    BadRecordError,
    ImageLimits,
    open_image,
    validate_text,
)
from data.loader import DataSourceError

FORMATS = ("paddle", "labelstudio", "csv")
REMOTE = ("http://", "https://", "s3://", "gs://", "azure-blob://")


@dataclass
class Candidate:
    """One record before checking: where it came from, its image (a path) and region, its label."""

    id: str
    where: str
    path: str | None
    text: Any
    region: dict | None = None  # Label Studio box in percent: x, y, width, height, rotation


@dataclass
class ImportResult:
    """Records that passed (``id``, encoded image bytes, label) and the problems, in input order."""

    rows: list[tuple[str, bytes, str]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)


def _problem(rid: str, where: str, reason: str, message: str) -> dict[str, str]:
    return {"id": rid, "where": where, "reason": reason, "message": message}


# --------------------------------------------------------------------------------------------- parsers
def parse_paddle(path: str, split: str, root: str) -> tuple[list[Candidate], list[dict]]:
    """Records of a PaddleOCR rec label file (``image_path<TAB>label`` per line; blank lines skipped)."""
    out, problems = [], []
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    n = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rid, where = f"{split}-{n}", f"{path}:{lineno}"
        n += 1
        if "\t" not in line:
            problems.append(_problem(rid, where, "bad_line", f"no tab in {line[:60]!r}: a PaddleOCR rec label "
                                     "line is image_path<TAB>label (a space does not separate them)"))
            continue
        img, text = line.split("\t", 1)  # PaddleOCR splits on the first tab; the rest is the label
        out.append(Candidate(rid, where, _join(root, img), text))
    return out, problems


def _ls_image_ref(data: dict, image_key: str | None) -> tuple[str | None, str]:
    """The task's image reference: ``data[image_key]`` or the one string value of ``data``."""
    if image_key:
        return data.get(image_key), image_key
    keys = [k for k, v in data.items() if isinstance(v, str)]
    for k in ("ocr", "image", "img"):
        if k in keys:
            return data[k], k
    return (data[keys[0]], keys[0]) if len(keys) == 1 else (None, ",".join(keys))


def _ls_local_path(ref: str, root: str) -> str:
    """Label Studio's URL forms for local files, mapped to a path under the media / storage root."""
    if ref.startswith("/data/local-files/"):
        # /data/local-files/?d=folder/x.jpg : a path relative to the local-storage document root.
        return _join(root, ref.split("?d=", 1)[1] if "?d=" in ref else ref[len("/data/local-files/"):])
    if ref.startswith("/data/"):
        return _join(root, ref[len("/data/"):])  # /data/upload/3/ab12-x.jpg lives in <media>/upload/3/
    return _join(root, ref)


def parse_labelstudio(path: str, split: str, root: str, image_key: str | None = None
                      ) -> tuple[list[Candidate], list[dict]]:
    """Records of a Label Studio JSON export (OCR template): one per transcribed region."""
    with open(path, encoding="utf-8") as f:
        try:
            tasks = json.load(f)
        except json.JSONDecodeError as e:
            raise DataSourceError("bad_json", f"{path} is not JSON ({e}); export the project as JSON "
                                  "(not JSON-MIN or CSV).") from e
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DataSourceError("bad_json", f"{path}: expected a list of tasks, got {type(tasks).__name__}")
    out, problems = [], []
    for t_index, task in enumerate(tasks):
        tid = str(task.get("id", t_index)) if isinstance(task, dict) else str(t_index)
        where = f"{path}: task {tid}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.append(_problem(f"{split}-{tid}", where, "bad_json", "task is not an object with a 'data' object"))
            continue
        ref, key = _ls_image_ref(task["data"], image_key)
        if not isinstance(ref, str) or not ref:
            problems.append(_problem(f"{split}-{tid}", where, "missing_column",
                                     f"no image reference in data (keys {sorted(task['data'])}; tried {key!r}); "
                                     "pass --image-key NAME"))
            continue
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            problems.append(_problem(f"{split}-{tid}", where, "no_annotation",
                                     "the task has no annotation that was not cancelled"))
            continue
        results = [r for r in annotations[-1].get("result") or [] if isinstance(r, dict)]  # the latest one
        geometry = {r.get("id"): r.get("value", {}) for r in results if r.get("type") in ("rectangle", "polygon", "labels")}
        texts = [r for r in results if r.get("type") == "textarea"]
        if not texts:
            problems.append(_problem(f"{split}-{tid}", where, "no_annotation", "the annotation has no transcription "
                                     "(a TextArea result)"))
            continue
        remote = ref.startswith(REMOTE)
        img_path = None if remote else _ls_local_path(ref, root)
        for r in texts:
            value = r.get("value") or {}
            rid = f"{split}-{tid}-{r.get('id', len(out))}"
            rwhere = f"{where} region {r.get('id')}"
            if remote:
                problems.append(_problem(rid, rwhere, "remote_image", f"image {ref!r} is a URL; download the files "
                                         "and pass --image-root, we do not fetch images"))
                continue
            lines = value.get("text")
            lines = [lines] if isinstance(lines, str) else list(lines or [])
            if len(lines) > 1:
                problems.append(_problem(rid, rwhere, "multiline_label", f"the region has {len(lines)} transcription "
                                         f"lines {lines!r:.60}; a text-line record holds one: split the region"))
                continue
            box = value if "width" in value or "points" in value else geometry.get(r.get("id"))
            out.append(Candidate(rid, rwhere, img_path, lines[0] if lines else None, region=box or None))
    return out, problems


def parse_csv(path: str, split: str, root: str, image_column: str, text_column: str, id_column: str | None = None,
              delimiter: str = ",") -> tuple[list[Candidate], list[dict]]:
    """Records of a CSV file with a header row and the named columns."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in (image_column, text_column, id_column) if c and c not in header]
        if missing:
            raise DataSourceError("missing_column", f"{path} has no column(s) {missing}; header: {header}. Name "
                                  "yours with --image-column / --text-column / --id-column (and --delimiter).")
        out, problems = [], []
        for index, row in enumerate(reader):
            where = f"{path}:{reader.line_num}"
            rid = str(row[id_column]) if id_column and row.get(id_column) else f"{split}-{index}"
            if row.get(image_column) in (None, "") or row.get(text_column) is None:
                problems.append(_problem(rid, where, "missing_column", f"row lacks a value for {image_column!r} or "
                                         f"{text_column!r} (fewer fields than the header?)"))
                continue
            out.append(Candidate(rid, where, _join(root, row[image_column]), row[text_column]))
    return out, problems


def _join(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


# --------------------------------------------------------------------------------------------- checks
def _crop(im: Image.Image, region: dict, rid: str) -> Image.Image:
    """Cut a Label Studio region (percent of the image; rotation in degrees, clockwise, about the top-left)."""
    w, h = im.size
    if "points" in region:  # polygon: its bounding box
        xs = [p[0] for p in region["points"]]
        ys = [p[1] for p in region["points"]]
        region = {"x": min(xs), "y": min(ys), "width": max(xs) - min(xs), "height": max(ys) - min(ys), "rotation": 0}
    try:
        x, y = float(region["x"]) * w / 100, float(region["y"]) * h / 100
        bw, bh = float(region["width"]) * w / 100, float(region["height"]) * h / 100
        angle = math.radians(float(region.get("rotation") or 0))
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecordError(rid, "bad_region", f"region {region!r:.80} lacks x/y/width/height ({e})") from e
    ow, oh = round(bw), round(bh)
    c, s = math.cos(angle), math.sin(angle)
    corners = [(x + u * c - v * s, y + u * s + v * c) for u, v in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    inside = all(-1 <= cx <= w + 1 and -1 <= cy <= h + 1 for cx, cy in corners)  # 1 px of rounding slack
    if ow < 1 or oh < 1 or not inside:
        raise BadRecordError(rid, "bad_region", f"box x={x:.0f} y={y:.0f} w={bw:.0f} h={bh:.0f} px (rotation "
                             f"{math.degrees(angle):.0f}) is empty or reaches outside the {w}x{h} image")
    # Output pixel (u, v) comes from x + u*c - v*s, y + u*s + v*c: the box's own axes, rotated clockwise on screen.
    return im.transform((ow, oh), Image.AFFINE, (c, -s, x, s, c, y), resample=Image.BICUBIC)


def check_candidates(cands: list[Candidate], root: str, *, allow_outside: bool = False,
                     limits: ImageLimits = DEFAULT_LIMITS, max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
                     ) -> ImportResult:
    """Decode and check every candidate with the loader's rules; return the good rows and the problems."""
    from data.loader import _outside_root  # the loader's own containment rule

    res = ImportResult()
    real_root = os.path.realpath(root)
    for c in cands:
        try:
            text = validate_text(c.text, record_id=c.id, max_chars=max_label_chars)
            if not allow_outside and c.path is not None:
                real = _outside_root(c.path, real_root)
                if real is not None:
                    raise BadRecordError(c.id, "path_outside_root", f"image path {c.path!r} resolves to {real!r}, "
                                         f"outside the image root {real_root!r}; set --image-root to a folder that "
                                         "contains it, or --allow-paths-outside-root")
            im = open_image(c.path, record_id=c.id, limits=limits)
            if c.region:
                crop = _crop(im, c.region, c.id)
                open_image(crop, record_id=c.id, limits=limits)  # the crop obeys the size limits too
                buf = io.BytesIO()
                crop.save(buf, format="PNG")
                data = buf.getvalue()
            else:
                with open(c.path, "rb") as f:
                    data = f.read()  # the file as it is: no re-encoding loss
        except BadRecordError as e:
            res.problems.append(_problem(c.id, c.where, e.reason, str(e)))
            continue
        res.rows.append((c.id, data, text))
    return res


# --------------------------------------------------------------------------------------------- writing
def write_split(out: str, split: str, rows: list[tuple[str, bytes, str]]) -> str:
    """Write ``rows`` as ``out/data/{split}-00000-of-00001.parquet`` (id, image, text); return the path."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                "text": datasets.Value("string")}).arrow_schema
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    path = os.path.join(out, "data", f"{split}-00000-of-00001.parquet")
    table = pa.Table.from_arrays([pa.array([r[0] for r in rows], pa.string()),
                                  pa.array([{"bytes": r[1], "path": None} for r in rows], schema.field("image").type),
                                  pa.array([r[2] for r in rows], pa.string())], schema=schema)
    pq.write_table(table, path)
    return path


def import_labels(fmt: str, source: str, out: str, split: str, *, image_root: str | None = None,
                  on_bad_record: str = "error", allow_paths_outside_root: bool = False, image_key: str | None = None,
                  image_column: str = "image", text_column: str = "text", id_column: str | None = None,
                  delimiter: str = ",") -> dict:
    """Convert one label file into ``out``'s parquet layout; return the summary (also ``out/import-{split}.json``).

    Args:
        fmt: ``paddle``, ``labelstudio`` or ``csv``.
        source: The label file.
        out: Output dataset folder.
        split: Split name to write.
        image_root: Folder relative image paths resolve against (default: the label file's folder).
        on_bad_record: ``error`` (write nothing if any record is bad) or ``skip`` (write the good ones).
        allow_paths_outside_root: Accept images outside the root.
        image_key: Label Studio ``data`` key holding the image (default ``ocr``/``image``/the only one).
        image_column: CSV column of image paths.
        text_column: CSV column of labels.
        id_column: Optional CSV column of record ids.
        delimiter: CSV delimiter.

    Returns:
        ``{"format", "source", "split", "n_records", "n_written", "problems", "reasons", "parquet"}``;
        ``parquet`` is None when nothing was written.

    Raises:
        DataSourceError: The label file is missing or unreadable as a whole.
        ValueError: Unknown format or on_bad_record value.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record {on_bad_record!r} is not one of 'error', 'skip'")
    if not os.path.isfile(source):
        raise DataSourceError("source_not_found", f"label file {source!r} does not exist")
    root = image_root or os.path.dirname(os.path.abspath(source))
    if not os.path.isdir(root):
        raise DataSourceError("source_not_found", f"image root {root!r} is not a folder")
    if fmt == "paddle":
        cands, problems = parse_paddle(source, split, root)
    elif fmt == "labelstudio":
        cands, problems = parse_labelstudio(source, split, root, image_key)
    else:
        cands, problems = parse_csv(source, split, root, image_column, text_column, id_column, delimiter)
    res = check_candidates(cands, root, allow_outside=allow_paths_outside_root)
    all_problems = problems + res.problems  # format problems first, then image/label ones, each in input order
    written = None
    if res.rows and (on_bad_record == "skip" or not all_problems):
        written = write_split(out, split, res.rows)
    reasons: dict[str, int] = {}
    for p in all_problems:
        reasons[p["reason"]] = reasons.get(p["reason"], 0) + 1
    summary = {"format": fmt, "source": source, "split": split, "image_root": root, "on_bad_record": on_bad_record,
               "n_records": len(cands) + len(problems), "n_written": len(res.rows) if written else 0,
               "reasons": reasons, "problems": all_problems, "parquet": written}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"import-{split}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m data.importers", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=FORMATS)
    p.add_argument("source", help="the label file (Paddle .txt, Label Studio .json, .csv)")
    p.add_argument("--out", required=True, help="dataset folder to write (OUT/data/{split}-00000-of-00001.parquet)")
    p.add_argument("--split", required=True, help="split name, e.g. train, val, test")
    p.add_argument("--image-root", help="folder relative image paths resolve against (default: the label file's)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--allow-paths-outside-root", action="store_true")
    p.add_argument("--image-key", help="labelstudio: the task data key holding the image")
    p.add_argument("--image-column", default="image", help="csv: image path column")
    p.add_argument("--text-column", default="text", help="csv: label column")
    p.add_argument("--id-column", help="csv: record id column (default: split-index)")
    p.add_argument("--delimiter", default=",", help="csv: field delimiter")
    a = p.parse_args(argv)
    try:
        s = import_labels(a.format, a.source, a.out, a.split, image_root=a.image_root, on_bad_record=a.on_bad_record,
                          allow_paths_outside_root=a.allow_paths_outside_root, image_key=a.image_key,
                          image_column=a.image_column, text_column=a.text_column, id_column=a.id_column,
                          delimiter=a.delimiter)
    except DataSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prob in s["problems"]:
        print(f"{prob['id']}\t{prob['where']}\t{prob['reason']}\t{prob['message']}")
    if s["parquet"]:
        print(f"wrote {s['n_written']} of {s['n_records']} records to {s['parquet']}"
              + (f"; {len(s['problems'])} bad record(s) listed above, not written" if s["problems"] else ""))
        return 0
    print(f"wrote nothing: {len(s['problems'])} bad record(s) of {s['n_records']} {s['reasons']}; fix them, or pass "
          "--on-bad-record skip to write the good ones (the bad stay listed in "
          f"{os.path.join(a.out, f'import-{a.split}.json')})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
