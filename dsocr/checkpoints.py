"""What a checkpoint of this pipeline is: its files, how to find the usable ones, and what is wrong with one.

A run folder (``output_dir``) holds ``run_config.yaml``, ``checkpoint-N/`` folders written atomically by the
trainer (``dsocr/checkpointing.py``) and, once training finished, ``final/``. A checkpoint folder holds the
weights: a LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) or, for full fine-tuning
(``finetune.method: full``), the whole model (``config.json`` + ``model*.safetensors``); the resolved
``run_config.yaml``; and, for ``checkpoint-N``, what an exact resume needs: ``trainer_state.json``, the
optimizer and scheduler (``optimizer.pt`` + ``scheduler.pt``, or DeepSpeed's ``latest`` + ``global_stepN/``
with one optimizer shard per rank), one RNG file per rank (``rng_state.pth`` in a one-process run,
``rng_state_R.pth`` for rank R otherwise) and ``launch.json`` (world size, global batch, DeepSpeed stage).

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
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # full fine-tuning (one file or shards)
TRAINER_STATE = "trainer_state.json"
LAUNCH_FILE = "launch.json"  # how the run that saved the checkpoint was launched (world size, global batch)
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


def rng_state_name(rank: int, world_size: int) -> str:
    """The RNG file of ``rank``: ``rng_state.pth`` in a one-process run, ``rng_state_R.pth`` otherwise (as HF)."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{rank}.pth"


def checkpoint_kind(path: str | Path) -> str | None:
    """``lora`` (an adapter folder), ``full`` (a whole model) or None (neither)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return "lora"
    if (path / "config.json").is_file() and any((path / w).is_file() for w in FULL_WEIGHTS):
        return "full"
    return None


def deepspeed_step_dir(path: str | Path) -> Path | None:
    """The ``global_stepN`` folder a DeepSpeed checkpoint's ``latest`` file names (None: not DeepSpeed)."""
    path = Path(path)
    if not (path / "latest").is_file():
        return None
    return path / (path / "latest").read_text().strip()


def launch_info(path: str | Path) -> dict:
    """``launch.json`` of a checkpoint; for older ones, the world size told by the RNG files."""
    path = Path(path)
    if (path / LAUNCH_FILE).is_file():
        return json.loads((path / LAUNCH_FILE).read_text())
    per_rank = list(path.glob("rng_state_*.pth"))
    return {"world_size": len(per_rank) if per_rank else 1}


def is_complete_checkpoint(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint has everything an exact resume needs; if not, which files are missing."""
    path = Path(path)
    missing = [n for n in (TRAINER_STATE, CONFIG_FILE_NAME) if not (path / n).is_file()]
    if (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():  # full fine-tuning
        if not any((path / w).is_file() for w in FULL_WEIGHTS):
            missing.append(FULL_WEIGHTS[0])
    else:
        if not (path / ADAPTER_CONFIG).is_file():
            missing.append(ADAPTER_CONFIG)
        if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
            missing.append(ADAPTER_WEIGHTS[0])
    world = int(launch_info(path).get("world_size", 1))
    step_dir = deepspeed_step_dir(path)
    if step_dir is not None:
        # DeepSpeed: optimizer (and scheduler) state in global_stepN/, one ZeRO shard per rank.
        shards = list(step_dir.glob("*optim_states.pt")) if step_dir.is_dir() else []
        if len(shards) < world:
            missing.append(f"{step_dir.name}/*optim_states.pt ({len(shards)} of {world} ranks)")
    else:
        missing += [n for n in ("optimizer.pt", "scheduler.pt") if not (path / n).is_file()]
    # Without them dropout & co. restart from another RNG state; one per rank.
    missing += [n for n in (rng_state_name(r, world) for r in range(world)) if not (path / n).is_file()]
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


def plan_resume(resume: str | None, output_dir: str | Path, max_steps: int | None = None,
                launch: dict | None = None) -> ResumePlan:
    """Resolve ``resume_from_checkpoint`` against the run folder; raise ``CheckpointError`` if it cannot be met.

    Args:
        resume: ``None`` (fresh), ``"latest"`` (newest complete checkpoint; an error if there is none),
            ``"auto"`` (newest complete checkpoint if there is one, else fresh: what a requeued job
            needs) or a checkpoint folder.
        output_dir: The run folder.
        max_steps: The run's ``training.max_steps`` (> 0): a checkpoint at or past it means the run has
            finished, and resuming it must train nothing (HF would train one more step and overwrite
            ``final/``).
        launch: This run's ``launch.json`` values (``world_size``, ``global_batch``, ``deepspeed``): a
            checkpoint of another launch is checked against it (``check_launch``).
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
    note = check_launch(path, launch) if launch else ""
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return ResumePlan(str(path), True, f"resume_from_checkpoint={resume} -> {path}: it is at step {step}, "
                                           f"max_steps is {max_steps}: the run has finished, nothing to train")
    return ResumePlan(str(path), False, f"resume_from_checkpoint={resume} -> {path} (step {step}){note}")


def check_launch(path: Path, launch: dict) -> str:
    """Whether a checkpoint saved by one launch can resume in another; raise ``CheckpointError`` if not.

    Same world size: an exact resume (every rank gets its own RNG file back). Another world size:

    * DeepSpeed checkpoints are refused: ZeRO keeps one optimizer shard per rank, laid out for that
      world size (DeepSpeed's universal checkpoints convert them; not wired here).
    * Otherwise (one process or DDP: full optimizer state in ``optimizer.pt``) the resume is allowed
      when the global batch (per device x accumulation x ranks) is unchanged: every optimizer step then
      covers the same lines as before (rank r takes the r-th per-device slice of each global batch) and
      the schedule is the same. It is not bit for bit: ranks without an RNG file start fresh streams
      and the gradient sums are added in another order. A different global batch is refused.

    Returns a note for the log ("" when nothing differs).
    """
    saved = launch_info(path)
    world, saved_world = int(launch.get("world_size", 1)), int(saved.get("world_size", 1))
    if world == saved_world:
        return ""
    what = f"{path} was saved by a run of {saved_world} process(es), this one has {world}"
    if saved.get("deepspeed"):
        raise CheckpointError(
            f"{what}, and it is a DeepSpeed ZeRO checkpoint (optimizer state split into {saved_world} per-rank "
            f"shards). To fix: resume with {saved_world} processes, or start fresh from its weights "
            f"(model.name_or_path={path} for a full fine-tune) with resume_from_checkpoint=null."
        )
    saved_batch, batch = saved.get("global_batch"), launch.get("global_batch")
    if saved_batch is not None and batch is not None and int(saved_batch) != int(batch):
        raise CheckpointError(
            f"{what}, and the global batch changed from {saved_batch} to {batch} (per_device_train_batch_size x "
            "gradient_accumulation_steps x processes): the learning-rate schedule and the lines of each step "
            f"would no longer match the saved run. To fix: set training.gradient_accumulation_steps (or "
            f"per_device_train_batch_size) so that the global batch is {saved_batch} again, or resume with "
            f"{saved_world} processes."
        )
    return (f"; launched with {world} process(es) instead of {saved_world}: same global batch, so every step "
            "covers the same lines, but not bit for bit (new ranks start fresh RNG streams, gradients are "
            "summed in another order)")


# ------------------------------------------------------------------ diagnosing --ckpt


def is_checkpoint(path: str | Path) -> bool:
    """A pipeline checkpoint: a folder with a LoRA adapter or a full model, and the run config beside it."""
    path = Path(path)
    return checkpoint_kind(path) is not None and (path / CONFIG_FILE_NAME).is_file()


def _usable_siblings(run_dir: Path) -> str:
    """The checkpoints of a run folder that hold adapter + weights + config, newest first, for hints."""
    found = [p for p in run_dir.glob("*") if p.is_dir() and (p.name == "final" or CHECKPOINT_RE.fullmatch(p.name))
             and is_checkpoint(p)
             and any((p / w).is_file() for w in (*ADAPTER_WEIGHTS, *FULL_WEIGHTS))]
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
