r"""Turn loaded records into the conversation format the collator consumes.

A conversation (the seed notebook's format)::

    {"id": "train-17",
     "messages": [
         {"role": "<|User|>", "content": "<image>\nFree OCR.", "images": [<PIL RGB image>]},
         {"role": "<|Assistant|>", "content": "合计￥12.50"}]}

Images are decoded only here, one record at a time, through ``data.images.open_image``; labels go through
``data.images.validate_text`` (stripped). So a bad record fails with the same reason code and message as
``python -m data.check`` reports for it.

Skipped-record log (``ConversationDataset(on_bad_record="skip", skipped_log=...)``): JSONL, appended, one
line per skipped record **per process**::

    {"id": "train-17", "reason": "corrupt_image", "message": "record 'train-17': corrupt_image: ...", "split": "train"}

``split`` is the dataset's ``split`` argument (``null`` when not given). The same record appears once per
DataLoader worker and once per evaluation that re-reads the eval split, so count records with
:func:`count_skipped` (distinct ``(split, id)`` pairs per split), never by counting lines.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from data.images import DEFAULT_MAX_LABEL_CHARS, BadRecordError, ImageLimits, open_image, validate_text

DEFAULT_INSTRUCTION = "<image>\nFree OCR."
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
# count_skipped's key for log lines written without a split (ConversationDataset(split=None)).
NO_SPLIT = "(no split)"


def to_conversation(
    record: dict[str, Any],
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    limits: ImageLimits | None = None,
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
) -> dict[str, Any]:
    """Convert one ``{"id", "image", "text"}`` record into a two-message conversation.

    Args:
        record: A row of ``data.loader.load_split`` (``image`` undecoded or a PIL image).
        instruction: The user prompt; must contain ``<image>`` exactly once (one image per sample).
        limits: Image limits for ``open_image``.
        max_label_chars: Maximum label length for ``validate_text``.

    Returns:
        ``{"id": str, "messages": [user message with "images": [RGB image], assistant message]}``.

    Raises:
        BadRecordError: The image or label is unusable (see ``data.images``).
        ValueError: The instruction does not contain exactly one ``<image>``.
    """
    if instruction.count("<image>") != 1:
        raise ValueError(f"instruction must contain '<image>' exactly once, got {instruction!r}.")
    rid = str(record.get("id", "?"))
    for col in ("image", "text"):
        if col not in record:
            raise BadRecordError(
                rid,
                "missing_column",
                f"record has no {col!r} key (keys: {sorted(record)}); load it with data.loader.load_split.",
            )
    # Label first: it is cheap, and a bad label should not cost an image decode.
    text = validate_text(record["text"], record_id=rid, max_chars=max_label_chars)
    image = open_image(record["image"], record_id=rid, limits=limits)
    return {
        "id": rid,
        "messages": [
            {"role": USER_ROLE, "content": instruction, "images": [image]},
            {"role": ASSISTANT_ROLE, "content": text},
        ],
    }


class ConversationDataset:
    """Map-style (torch ``Dataset`` protocol) view of a loaded split as conversations.

    ``__getitem__(i)`` decodes record ``i`` and returns :func:`to_conversation`'s output.

    Bad records, by ``on_bad_record``:

    * ``"error"`` (default): :class:`~data.images.BadRecordError` propagates: training stops and names the
      record. Run ``python -m data.check`` first to list every bad record at once.
    * ``"skip"``: the record is **not dropped silently**. ``__getitem__`` returns ``None`` for it; the
      record is counted in ``skipped_count`` (and ``skipped_reasons``) and written once per process as a JSON
      line ``{"id", "reason", "message", "split"}`` to ``skipped_log`` (appended; one ``write`` per line so
      several DataLoader workers can share the file). The collator must drop the ``None`` items and report
      how many it dropped. Note: with DataLoader workers the counters live in each worker process and
      each worker logs the record again; :func:`count_skipped` on the log gives the distinct records per
      split, the authoritative totals.

    Args:
        hf_dataset: A dataset with ``id``, ``image``, ``text`` columns (``data.loader.load_split``).
        instruction: User prompt containing ``<image>`` once.
        on_bad_record: ``"error"`` or ``"skip"``.
        skipped_log: JSONL path for skipped records (``"skip"`` only; ``None`` = counted only, not
            logged to a file).
        max_label_chars: Maximum label length.
        limits: Image limits.
        split: The split's name (``train``, ``val``...), written into each log line so
            :func:`count_skipped` can tell the same id in two splits apart; ``None`` writes ``null``.
    """

    def __init__(
        self,
        hf_dataset: Any,
        instruction: str = DEFAULT_INSTRUCTION,
        on_bad_record: str = "error",
        skipped_log: str | os.PathLike | None = None,
        max_label_chars: int = DEFAULT_MAX_LABEL_CHARS,
        limits: ImageLimits | None = None,
        split: str | None = None,
    ):
        """Validate the settings; nothing is decoded here."""
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record {on_bad_record!r} is not one of 'error', 'skip'.")
        if skipped_log is not None and on_bad_record != "skip":
            raise ValueError(
                "skipped_log is only used with on_bad_record='skip'; remove it or switch to 'skip'."
            )
        if instruction.count("<image>") != 1:
            raise ValueError(f"instruction must contain '<image>' exactly once, got {instruction!r}.")
        missing = [c for c in ("id", "image", "text") if c not in hf_dataset.column_names]
        if missing:
            raise ValueError(
                f"dataset lacks column(s) {missing} (has {hf_dataset.column_names}); load it with data.loader.load_split."
            )
        self.dataset = hf_dataset
        self.instruction = instruction
        self.on_bad_record = on_bad_record
        self.skipped_log = os.fspath(skipped_log) if skipped_log is not None else None
        self.max_label_chars = max_label_chars
        self.limits = limits
        self.split = split
        self.skipped_count = 0
        self.skipped_reasons: dict[str, int] = {}
        self._logged: set[str] = set()

    def __len__(self) -> int:
        """Number of records (bad ones included: they come back as ``None`` in skip mode)."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Return the conversation for record ``index``, or ``None`` for a skipped bad record."""
        record = self.dataset[index]
        try:
            return to_conversation(
                record, self.instruction, limits=self.limits, max_label_chars=self.max_label_chars
            )
        except BadRecordError as e:
            if self.on_bad_record == "error":
                raise
            self._record_skip(e)
            return None

    def _record_skip(self, err: BadRecordError) -> None:
        """Count a skipped record and log it once (per process) to ``skipped_log``."""
        if err.record_id in self._logged:
            return  # a later epoch meets the same record: counted and logged once
        self._logged.add(err.record_id)
        self.skipped_count += 1
        self.skipped_reasons[err.reason] = self.skipped_reasons.get(err.reason, 0) + 1
        if self.skipped_log is not None:
            folder = os.path.dirname(self.skipped_log)
            if folder:
                os.makedirs(folder, exist_ok=True)
            with open(self.skipped_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({**err.to_dict(), "split": self.split}, ensure_ascii=False) + "\n")


def count_skipped(log_path: str | os.PathLike) -> dict[str, int]:
    """Count the distinct skipped records per split in a ``ConversationDataset`` skip log.

    Lines are not records: every DataLoader worker logs a record it skips, and every evaluation re-reads
    the eval split, so the same ``(split, id)`` appears several times; it is counted once.

    Args:
        log_path: The ``skipped_log`` JSONL file.

    Returns:
        ``{split: number of distinct ids}``, sorted by split; lines written without a split count under
        :data:`NO_SPLIT`. A log that does not exist (nothing was skipped) gives ``{}``.

    Raises:
        ValueError: A line is not a JSON object with an ``id`` (e.g. cut off by a killed process); the
            message names the file and line.
    """
    path = os.fspath(log_path)
    if not os.path.exists(path):
        return {}
    seen: set[tuple[str, str]] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError(
                    f"{path}:{n}: not a skip-log line (expected a JSON object with 'id' and 'split', got "
                    f"{line.strip()[:80]!r}); the file is written by ConversationDataset(skipped_log=...): "
                    "remove or repair that line, then count again."
                )
            split = rec.get("split")
            seen.add((NO_SPLIT if split is None else str(split), str(rec["id"])))
    return dict(sorted(Counter(split for split, _ in seen).items()))
