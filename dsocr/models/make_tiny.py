"""Write a tiny random-weight model of a family, loadable like a hub checkpoint (tests, CPU demo).

    python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --out runs/tiny_models/deepseek_ocr_v1

The model is built from the real classes with shrunken sizes and saved with ``save_pretrained`` next
to the real tokenizer (built offline), so the pipeline loads it through the same ``from_pretrained``
path as ``deepseek-ai/DeepSeek-OCR``. Existing folders are left alone unless ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsocr.models import FAMILY_NAMES, get_family


def make_tiny(family: str, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Create (or reuse) the tiny model folder ``out`` for ``family``; returns its path."""
    out = Path(out)
    if (out / "config.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    get_family(family).make_tiny(out, seed=seed)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=FAMILY_NAMES)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")
    a = p.parse_args(argv)
    print(make_tiny(a.family, a.out, a.seed, a.force))


if __name__ == "__main__":
    main()
