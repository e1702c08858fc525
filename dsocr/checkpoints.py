"""What a checkpoint of this pipeline is: its files, how to find the usable ones, and what is wrong with one.

A run folder (``output_dir``) holds ``run_config.yaml``, ``checkpoint-N/`` folders written atomically by the
trainer (``dsocr/checkpointing.py``) and, once training finished, ``final/``. A checkpoint folder holds the
LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the resolved ``run_config.yaml`` and,
for ``checkpoint-N``, what an exact resume needs: ``trainer_state.json``, ``optimizer.pt``,
``scheduler.pt``, ``rng_state*.pth``.

Everything here only reads the file system: it is used before any model loads, so a wrong ``--ckpt`` or
``resume_from_checkpoint`` fails in a second with the path and the fix.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dsocr.config import CONFIG_FILE_NAME

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"  # .tmp-checkpoint-N: a save in progress (or interrupted)
TRASH_PREFIX = ".trash-"  # .trash-checkpoint-N: a rotated checkpoint being deleted


class CheckpointError(ValueError):
    """A checkpoint folder is not usable for what was asked; the message names the path and the fix."""


# ------------------------------------------------------------------ finding checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first (by step, not by name or mtime)."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint has everything an exact resume needs; if not, which files are missing."""
    path = Path(path)
    needed = [ADAPTER_CONFIG, TRAINER_STATE, "optimizer.pt", "scheduler.pt", CONFIG_FILE_NAME]
    missing = [n for n in needed if not (path / n).is_file()]
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    if not any(path.glob("rng_state*.pth")):  # without it dropout & co. restart from another RNG state
        missing.append("rng_state.pth")
    return (not missing, ", ".join(missing))


def leftover_temporaries(output_dir: str | Path) -> list[Path]:
    """``.tmp-*`` and ``.trash-*`` folders left by a save or rotation that was interrupted."""
    folder = Path(output_dir)
    return sorted(p for p in folder.glob(".*-checkpoint-*") if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)))


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (``global_step`` of its ``trainer_state.json``)."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["global_step"])


# ------------------------------------------------------------------ resume


@dataclass
class ResumePlan:
    """What ``train_lora.py`` does with ``resume_from_checkpoint``.

    Attributes:
        checkpoint: The folder to resume from, or None for a fresh run.
        finished: The checkpoint is already at ``max_steps``: there is nothing left to train.
        reason: One line for the log (what was asked, what was found, what happens).
    """

    checkpoint: str | None
    finished: bool
    reason: str


def _newest_complete(output_dir: str | Path) -> Path | None:
    for tmp in leftover_temporaries(output_dir):
        log.warning("ignoring %s: a checkpoint save or rotation that was interrupted (deleted when training "
                    "starts)", tmp)
    for ckpt in reversed(list_checkpoints(output_dir)):
        ok, missing = is_complete_checkpoint(ckpt)
        if ok:
            return ckpt
        log.warning("skipping incomplete checkpoint %s (missing: %s)", ckpt, missing)
    return None


def plan_resume(resume: str | None, output_dir: str | Path, max_steps: int | None = None) -> ResumePlan:
    """Resolve ``resume_from_checkpoint`` against the run folder; raise ``CheckpointError`` if it cannot be met.

    Args:
        resume: ``None`` (fresh), ``"latest"`` (newest complete checkpoint; an error if there is none),
            ``"auto"`` (newest complete checkpoint if there is one, else fresh: what a requeued job
            needs) or a checkpoint folder.
        output_dir: The run folder.
        max_steps: The run's ``training.max_steps`` (> 0): a checkpoint at or past it means the run has
            finished, and resuming it must train nothing (HF would train one more step and overwrite
            ``final/``).
    """
    if resume is None:
        return ResumePlan(None, False, "resume_from_checkpoint=null: fresh run")
    if resume in ("latest", "auto"):
        found = _newest_complete(output_dir)
        if found is None:
            if resume == "auto":
                return ResumePlan(None, False, f"resume_from_checkpoint=auto: no complete checkpoint in "
                                               f"{str(output_dir)!r}, starting a fresh run")
            raise CheckpointError(
                f"resume_from_checkpoint=latest but {str(output_dir)!r} holds no complete checkpoint-N folder. "
                "To fix: set resume_from_checkpoint=null to start fresh, resume_from_checkpoint=auto to resume "
                "only when there is a checkpoint, or point it at a checkpoint folder."
            )
        path = found
    else:
        path = Path(resume)
        ok, missing = is_complete_checkpoint(path)
        if not ok:
            raise CheckpointError(
                f"resume_from_checkpoint {resume!r} is incomplete (missing: {missing}). To fix: point it at a "
                "complete checkpoint-N folder, or use resume_from_checkpoint=latest to pick the newest complete one."
            )
    step = checkpoint_step(path)
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return ResumePlan(str(path), True, f"resume_from_checkpoint={resume} -> {path}: it is at step {step}, "
                                           f"max_steps is {max_steps}: the run has finished, nothing to train")
    return ResumePlan(str(path), False, f"resume_from_checkpoint={resume} -> {path} (step {step})")


# ------------------------------------------------------------------ diagnosing --ckpt


def is_checkpoint(path: str | Path) -> bool:
    """A pipeline checkpoint: a folder with a LoRA adapter and the run config beside it."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / CONFIG_FILE_NAME).is_file()


def _usable_siblings(run_dir: Path) -> str:
    """The checkpoints of a run folder that hold adapter + weights + config, newest first, for hints."""
    found = [p for p in run_dir.glob("*") if p.is_dir() and (p.name == "final" or CHECKPOINT_RE.fullmatch(p.name))
             and is_checkpoint(p) and any((p / w).is_file() for w in ADAPTER_WEIGHTS)]
    found.sort(key=lambda p: (p.name != "final", -int(p.name.split("-")[1]) if p.name != "final" else 0))
    return ", ".join(str(p) for p in found) or f"none in {str(run_dir)!r} yet"


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path: what ``from_pretrained`` would look up on the hub."""
    path = Path(name)
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
            and not path.parent.is_dir())


def checkpoint_problem(ckpt: str) -> str | None:
    """Why ``ckpt`` (a local folder) cannot be evaluated, with the fix; None if it can or is a hub id.

    Catches, before any model loads: a missing path, a run folder, a temporary of an interrupted save, a
    half-written checkpoint (adapter without run config or without weights) and an empty folder.
    """
    path = Path(ckpt)
    fix = "To fix: pass a complete checkpoint folder"
    if not path.exists():
        if looks_like_hub_id(ckpt):
            return None  # a hub id such as deepseek-ai/DeepSeek-OCR: loading will tell
        return f"--ckpt {ckpt!r} does not exist. {fix}, e.g. runs/<run>/checkpoint-N or runs/<run>/final."
    if not path.is_dir():
        return f"--ckpt {ckpt!r} is a file, not a folder. {fix} (the folder that holds {ADAPTER_CONFIG})."
    if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
        return (f"--ckpt {ckpt!r} is the temporary folder of an interrupted checkpoint save or rotation, not a "
                f"checkpoint. {fix}; usable: {_usable_siblings(path.parent)}.")
    has_adapter, has_cfg = (path / ADAPTER_CONFIG).is_file(), (path / CONFIG_FILE_NAME).is_file()
    if has_adapter and not has_cfg:
        return (f"--ckpt {ckpt!r} has {ADAPTER_CONFIG} but no {CONFIG_FILE_NAME}: a half-written checkpoint or "
                f"one not made by this pipeline. {fix}; usable: {_usable_siblings(path.parent)}.")
    if has_adapter and not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        return (f"--ckpt {ckpt!r} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
                f"a half-written checkpoint. {fix}; usable: {_usable_siblings(path.parent)}.")
    if has_cfg and not has_adapter and not (path / "config.json").is_file():
        return (f"--ckpt {ckpt!r} is a run folder, not a checkpoint. {fix} of that run: "
                f"{_usable_siblings(path)}.")
    if not has_adapter and not (path / "config.json").is_file():
        return (f"--ckpt {ckpt!r} holds no model: neither {ADAPTER_CONFIG} (a LoRA checkpoint) nor config.json "
                f"(a base model). {fix}, or a base model folder with --config FILE.")
    return None


def model_path_problem(name_or_path: str) -> str | None:
    """Why ``model.name_or_path`` cannot be loaded (a missing local folder), with the fix; None if it may.

    A hub id (``owner/name``) is left to ``from_pretrained``; anything else must be a folder with a
    ``config.json``, or transformers answers with "Repo id must be in the form..." about a path.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return (f"model.name_or_path {name_or_path!r} is a folder without config.json: not a model checkpoint. "
                    "To fix: point it at the folder that holds config.json and the *.safetensors weights.")
        return None
    if looks_like_hub_id(name_or_path):
        return None
    return (f"model.name_or_path {name_or_path!r} does not exist (and is not an owner/name hub id). To fix: make "
            "a tiny test model with `python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --out "
            f"{name_or_path}`, or on a machine with hub access `huggingface-cli download deepseek-ai/DeepSeek-OCR "
            f"--local-dir {name_or_path}` and copy the folder here.")
