"""The hard evaluation set: a fixed, versioned recipe of domain lines that everyone rebuilds identically.

Run::

    python -m data.hardset --out runs/hardset            # build (about 5 s), print and check the content hash
    python -m data.hardset --check runs/hardset          # re-hash an existing build against the pinned hash
    python eval/eval_cer.py --ckpt runs/x/final data.dataset=runs/hardset eval.split=test

Version ``v1``: 2,000 lines = 4 domains (receipt, invoice, medical, screenshot; :mod:`data.domains`) x 4
degradation levels (clean, mild, medium, hard) x 125 lines, the 16 cells interleaved (any prefix of 16 n
lines, e.g. ``eval.max_samples=160``, is balanced), split ``test``, ids
``hard-v1-<domain>-<level>-<k>``; line ``i`` is ``DomainGenerator.make(SEED, "test", i, domain, level)``
with ``SEED = 20261215``, so it shares no random stream with training data drawn by
``python -m data.domains`` (whose seeds are small integers; a training run should not use this seed).

Output::

    DIR/data/test-00000-of-00001.parquet   columns id, image (JPEG bytes), text, tags (see data.domains)
    DIR/hardset.json                        version, composition, content hash, fonts (sha256), renderer

Content hash: sha256 over the rows in order (id, text, the four tags and the sha256 of the image bytes,
each length-prefixed), computed from the parquet file as read back, so it checks what is on disk and does
not depend on the parquet writer's metadata. The pinned value of each version is in
``data/hardset_v1.json`` with the font files and renderer versions it was built with: the pixels depend on
the exact font files (Debian ``fonts-noto-cjk`` etc.), FreeType and libjpeg, so a different hash comes with
the list of what differs from the pinned build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import struct
import sys
import time

from data.domains import DOMAINS, LEVEL_NAMES, TAG_KEYS, DomainGenerator, Line, write_parquet
from data.generate import font_files, renderer_versions

VERSION = "v1"
SEED = 20261215
PER_CELL = 125  # lines per (domain, level): 4 x 4 x 125 = 2,000
SPLIT = "test"
PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"hardset_{VERSION}.json")


class HardSetMismatch(RuntimeError):
    """The build's content hash differs from the pinned one (the message lists what differs)."""


def composition(per_cell: int = PER_CELL) -> list[tuple[str, str, str]]:
    """``(id, domain, level)`` of every line, in file order: the 16 (domain, level) cells interleaved.

    Line ``16 k + 4 d + l`` is the ``k``-th of domain ``d``, level ``l``, so every prefix of 16 n lines
    (``eval.max_samples``) holds n lines of each cell.
    """
    return [(f"hard-{VERSION}-{d}-{lv}-{k:03d}", d, lv) for k in range(per_cell) for d in DOMAINS for lv in LEVEL_NAMES]


_GEN: DomainGenerator | None = None


def _make(args: tuple[int, str, str]) -> Line:
    index, domain, level = args
    global _GEN
    if _GEN is None:
        _GEN = DomainGenerator()
    return _GEN.make(SEED, SPLIT, index, domain=domain, level=level)


def content_hash(parquet_path: str) -> str:
    """sha256 of a built set's rows as read back (see the module docstring)."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_path)
    digest = hashlib.sha256()

    def put(b: bytes) -> None:
        digest.update(struct.pack("<Q", len(b)))
        digest.update(b)

    for row in table.to_pylist():
        put(row["id"].encode())
        put(row["text"].encode())
        for k in TAG_KEYS:
            put(row["tags"][k].encode())
        put(hashlib.sha256(row["image"]["bytes"]).digest())
    return digest.hexdigest()


def _tag_counts(rows: list[tuple[Line, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {k: {} for k in TAG_KEYS}
    for line, _ in rows:
        for k in ("domain", "level", "length"):
            counts[k][line.tags[k]] = counts[k].get(line.tags[k], 0) + 1
        for op in line.tags["degradations"].split("+"):
            counts["degradations"][op] = counts["degradations"].get(op, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def build(out: str, *, per_cell: int = PER_CELL, workers: int = 1) -> dict:
    """Write the hard set to ``out`` and return its manifest (also ``out/hardset.json``).

    Args:
        out: Output folder.
        per_cell: Lines per (domain, level); the pinned version uses :data:`PER_CELL` (smaller values are
            for tests and give another hash).
        workers: Processes; the output does not depend on it.

    Returns:
        The manifest: version, seed, n_lines, composition counts, content_sha256, file_sha256, fonts,
        renderer, seconds.
    """
    plan = composition(per_cell)
    t0 = time.perf_counter()
    args = [(i, d, lv) for i, (_, d, lv) in enumerate(plan)]
    if workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            lines = pool.map(_make, args, chunksize=50)  # map keeps the order
    else:
        lines = [_make(a) for a in args]
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    path = os.path.join(out, "data", f"{SPLIT}-00000-of-00001.parquet")
    write_parquet(path, lines, ids=[rid for rid, _, _ in plan])
    with open(path, "rb") as f:
        file_sha = hashlib.sha256(f.read()).hexdigest()
    gen = _GEN or DomainGenerator()
    faces = tuple(dict.fromkeys(f for d in DOMAINS for f in gen.faces[d]))
    manifest = {
        "version": VERSION, "seed": SEED, "split": SPLIT, "per_cell": per_cell, "n_lines": len(lines),
        "tag_counts": _tag_counts([(line, rid) for line, (rid, _, _) in zip(lines, plan)]),
        "content_sha256": content_hash(path), "file_sha256": file_sha,
        "font_files": font_files(faces), "renderer": renderer_versions(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with open(os.path.join(out, "hardset.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
    return manifest


def pinned() -> dict:
    """The pinned manifest of :data:`VERSION` (``data/hardset_v1.json``)."""
    with open(PINNED, encoding="utf-8") as f:
        return json.load(f)


def differences(manifest: dict, reference: dict) -> list[str]:
    """What differs between a build's fonts / renderer and the pinned build's (empty if nothing does)."""
    out = []
    ours = {f["file"]: f["sha256"] for f in manifest.get("font_files", [])}
    theirs = {f["file"]: f["sha256"] for f in reference.get("font_files", [])}
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            out.append(f"font {name}: here {str(ours.get(name, 'missing'))[:12]}, pinned "
                       f"{str(theirs.get(name, 'missing'))[:12]}")
    for k, v in reference.get("renderer", {}).items():
        if manifest.get("renderer", {}).get(k) != v:
            out.append(f"{k}: here {manifest.get('renderer', {}).get(k)}, pinned {v}")
    return out


def check(manifest: dict) -> None:
    """Raise :class:`HardSetMismatch` unless the build's content hash is the pinned one."""
    ref = pinned()
    if manifest["per_cell"] != ref["per_cell"] or manifest["content_sha256"] != ref["content_sha256"]:
        diffs = differences(manifest, ref) or ["no font or renderer difference: a change in data/domains.py or data/hardset.py?"]
        raise HardSetMismatch(
            f"hard set {VERSION} content hash {manifest['content_sha256']} != pinned {ref['content_sha256']} "
            f"(per_cell {manifest['per_cell']} vs {ref['per_cell']}). Differences from the pinned build:\n  "
            + "\n  ".join(diffs)
            + "\nTo fix: install the pinned font packages and Pillow (requirements.txt), or, when the recipe was "
            "changed on purpose, bump VERSION in data/hardset.py and pin the new hash."
        )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m data.hardset", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="build the set into this folder")
    p.add_argument("--check", metavar="DIR", help="re-hash an existing build and compare with the pinned hash")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    p.add_argument("--pin", action="store_true", help="write the build's manifest as the pinned one (maintainers)")
    a = p.parse_args(argv)
    if bool(a.out) == bool(a.check):
        p.error("give exactly one of --out DIR or --check DIR")
    if a.check:
        with open(os.path.join(a.check, "hardset.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["content_sha256"] = content_hash(os.path.join(a.check, "data", f"{SPLIT}-00000-of-00001.parquet"))
    else:
        manifest = build(a.out, workers=a.workers)
        print(f"wrote hard set {VERSION}: {manifest['n_lines']} lines to {a.out} in {manifest['seconds']:.1f} s; "
              f"domains {manifest['tag_counts']['domain']}, levels {manifest['tag_counts']['level']}")
    print(f"content sha256 {manifest['content_sha256']}")
    if a.pin:
        with open(PINNED, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in manifest.items() if k != "seconds"}, f, ensure_ascii=False, indent=2)
        print(f"pinned -> {PINNED}")
        return 0
    try:
        check(manifest)
    except HardSetMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"matches the pinned hash of {VERSION} ({os.path.relpath(PINNED)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
