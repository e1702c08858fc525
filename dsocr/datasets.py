"""The run's datasets: the config's ``data:`` block turned into conversation datasets and records.

One place for what training, both evaluations and later scripts read, so that every one of them applies the
same bad-record rule, image limits, label limit and instruction.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data.convert import ConversationDataset, count_skipped
from data.loader import TAGS, load_split
from dsocr.config import RunConfig, image_limits

log = logging.getLogger(__name__)
SKIPPED_LOG = "skipped_records.jsonl"


def load_conversations(cfg: RunConfig, split: str, max_samples: int | None = None, *,
                       skipped_log: Path | None = None, instruction: str | None = None) -> ConversationDataset:
    """One split of ``cfg.data.dataset`` as a ``ConversationDataset`` (images decoded on access).

    Args:
        cfg: The run config (``data.*`` settings, ``collator.instruction``).
        split: Split name.
        max_samples: Keep the first N rows.
        skipped_log: Where skipped bad records are logged (``data.on_bad_record: skip`` only).
        instruction: The prompt; default ``cfg.collator.instruction``.
    """
    d = cfg.data
    rows = load_split(d.dataset, split, column_map=dict(d.column_map), image_root=d.image_root,
                      max_samples=max_samples, allow_paths_outside_root=d.allow_paths_outside_root)
    return ConversationDataset(
        rows, instruction=instruction or cfg.collator.instruction, on_bad_record=d.on_bad_record,
        skipped_log=skipped_log if d.on_bad_record == "skip" else None, max_label_chars=d.max_label_chars,
        limits=image_limits(cfg), split=split,
    )


def build_train_eval(cfg: RunConfig, output_dir: Path) -> tuple[ConversationDataset, ConversationDataset]:
    """Train and eval splits of a training run; skipped records go to ``<output_dir>/skipped_records.jsonl``."""
    d = cfg.data
    log_path = output_dir / SKIPPED_LOG
    train = load_conversations(cfg, d.train_split, d.max_train_samples, skipped_log=log_path)
    evalset = load_conversations(cfg, d.eval_split, d.max_eval_samples, skipped_log=log_path)
    return train, evalset


def skipped_counts(output_dir: Path) -> dict[str, int]:
    """Distinct skipped records per split, from the run's log (the DataLoader workers write it too)."""
    return count_skipped(output_dir / SKIPPED_LOG)


def load_eval_records(cfg: RunConfig, instruction: str | None = None) -> list[dict]:
    """Every usable record of ``cfg.eval.split`` (decoded), bad ones per ``data.on_bad_record``."""
    conv = load_conversations(cfg, cfg.eval.split, cfg.eval.max_samples, instruction=instruction)
    records = [conv[i] for i in range(len(conv))]
    kept = [r for r in records if r is not None]
    if len(kept) < len(records):
        log.warning("%d bad records skipped (data.on_bad_record=skip): %s", len(records) - len(kept),
                    conv.skipped_reasons)
    return kept


def load_eval_tags(cfg: RunConfig) -> dict[str, dict] | None:
    """Per-line tags of ``cfg.eval.split`` by record id, or None when the dataset has no ``tags`` column.

    Tagged datasets come from ``python -m data.domains`` and ``python -m data.hardset``; images are not
    decoded here (the column is read on its own).
    """
    d = cfg.data
    rows = load_split(d.dataset, cfg.eval.split, column_map=dict(d.column_map), image_root=d.image_root,
                      max_samples=cfg.eval.max_samples, allow_paths_outside_root=d.allow_paths_outside_root)
    if TAGS not in rows.column_names:
        return None
    return dict(zip(rows["id"], rows[TAGS], strict=True))
