"""Checkpoints that survive kills, full disks and signals: atomic folders, safe rotation, graceful stop.

A ``checkpoint-N`` folder exists only once it is complete. ``OCRTrainer._save_checkpoint`` writes into
``.tmp-checkpoint-N`` inside the run folder, fsyncs every file and the folder, then renames it: a rename
within one filesystem is atomic, so a kill (or ENOSPC) at any moment leaves either the old set of
checkpoints or the old set plus the new one, never a half-written ``checkpoint-N`` that ``latest`` would
pick. Deletion is the mirror image: rotate by renaming to ``.trash-checkpoint-N`` first, then delete.
Leftover ``.tmp-*``/``.trash-*`` folders are removed (with a log line) when the next run starts.

Signals: ``StopOnSignal`` turns the first SIGTERM/SIGINT into "save at the end of this optimizer step,
then stop"; a second one exits at once (exit code 128 + signal number, e.g. 143), which is safe because
of the atomic writes. A run stopped by the first signal ends with ``EXIT_INTERRUPTED`` (75, sysexits'
EX_TEMPFAIL: "try again later"), so a job script can tell "finished" (0) from "resume me" (75).

Test hook: ``OCR_TEST_PAUSE=<point>:<step>`` (points below) makes training stop at that point, write
``<output_dir>/.test-paused`` and wait until a test deletes it (or kills the process). It lets tests
SIGKILL or signal a run at an exact place instead of racing a timer; unset, it costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dsocr.checkpoints import (
    TMP_PREFIX,
    TRASH_PREFIX,
    is_complete_checkpoint,
    leftover_temporaries,
    list_checkpoints,
)

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: resume with latest
PAUSE_ENV = "OCR_TEST_PAUSE"
# step: end of optimizer step N, before its log/eval/save | save: mid-save of checkpoint-N (adapter
# written, optimizer not yet) | saved: right after checkpoint-N was published and rotation ran.
PAUSE_POINTS = ("step", "save", "saved")


def clean_leftovers(output_dir: str | Path) -> None:
    """Delete interrupted saves/rotations; they never hold anything a complete checkpoint lacks."""
    for p in leftover_temporaries(output_dir):
        log.warning("removing %s left by an interrupted checkpoint save or rotation", p)
        shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ atomic publish and safe rotation


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable, then atomically rename it to ``final`` (replacing an older ``final``).

    fsync of the files before the rename: otherwise a power loss can leave a renamed folder of empty files
    (the rename is journaled before the data). fsync of the parent after it: the rename itself is durable.
    """
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    old = None
    if final.exists():  # same step saved twice (e.g. signal stop at an epoch end): keep the newer
        old = final.with_name(TRASH_PREFIX + final.name)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rotate(output_dir: str | Path, limit: int | None, best: str | Path | None) -> list[Path]:
    """Keep at most ``limit`` checkpoints (newest first), but always the newest complete one and the best.

    HF's own rotation protects the newest folder whether or not it is complete and orders by mtime (which
    some filesystems do not keep); this one orders by step and never deletes the only usable checkpoint.
    A folder is renamed to ``.trash-…`` before deletion, so a kill mid-delete cannot leave a half folder
    that still looks like a checkpoint. Returns the deleted folders.
    """
    if not limit or limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    complete = [c for c in ckpts if is_complete_checkpoint(c)[0]]
    protected = {ckpts[-1].name} if ckpts else set()  # the newest, as HF does
    if complete:
        protected.add(complete[-1].name)
    if best:
        protected.add(Path(best).name)
    keep = max(limit, len(protected))
    deleted = []
    for ckpt in ckpts:  # oldest first
        if len(ckpts) - len(deleted) <= keep:
            break
        if ckpt.name in protected:
            continue
        trash = ckpt.with_name(TRASH_PREFIX + ckpt.name)
        os.replace(ckpt, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted %s (save_total_limit=%d)", ckpt, limit)
        deleted.append(ckpt)
    return deleted


def finish_from_checkpoint(checkpoint: str | Path, output_dir: str | Path, cfg) -> dict:
    """A run resumed at or past ``max_steps``: train nothing; make sure ``final/`` exists; return its metrics.

    ``final/`` is left untouched when present. When a job died between its last checkpoint and writing
    ``final/``, the adapter and run config of that checkpoint become ``final/`` (written atomically), which
    is what the finished run would have saved.
    """
    import json

    from dsocr.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE_NAME, checkpoint_step

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    step = checkpoint_step(checkpoint)
    final = output_dir / "final"
    if not final.is_dir():
        tmp = output_dir / f"{TMP_PREFIX}final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, CONFIG_FILE_NAME):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        publish(tmp, final)
        log.info("the run had finished at step %d but had no final/: wrote it from %s", step, checkpoint)
    log.info("nothing to train: %s is at step %d, the run's max_steps; final adapter in %s", checkpoint, step, final)
    results = output_dir / "all_results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    metrics.update({"already_finished": True, "global_step": step, "final": str(final)})
    return metrics


# ------------------------------------------------------------------ RNG isolation


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving the training RNG streams (python, numpy, torch CPU and CUDA).

    Evaluation (the eval-before in main(), eval_steps, CER generation) must not consume random numbers
    the training steps would otherwise draw: a fresh run evaluates before step 1 and a resumed one does
    not, and with ``eval_strategy: no`` vs ``steps`` the adapters would differ for no reason.
    """
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    # This process's current device only: with one process per GPU, *_all would create a CUDA context on
    # every visible GPU in every rank (and none but its own is used).
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------ signals


class StopOnSignal:
    """First SIGTERM/SIGINT: ask for a checkpoint at the end of the current optimizer step, then stop.

    A second one exits at once with 128 + signal number. Use as a context manager around
    ``Trainer.train``: handlers are installed on entry and the previous ones restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        """``SIGTERM``/``SIGINT`` once one was received."""
        return signal.Signals(self.received).name if self.received else None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            log.error("second %s: exiting now without saving; resume_from_checkpoint=latest resumes from the "
                      "last complete checkpoint", signal.Signals(signum).name)
            os._exit(128 + signum)  # no cleanup: an unfinished save is a .tmp folder, ignored on restart
        self.received = signum
        log.warning("%s received: saving a checkpoint at the end of the current optimizer step, then stopping "
                    "(send it again to exit at once)", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM/SIGINT keep their default behaviour")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------ test hook


_paused: set[str] = set()


def pause_for_test(point: str, step: int, output_dir: str | Path) -> None:
    """If ``OCR_TEST_PAUSE=<point>:<step>`` matches, write ``.test-paused`` and wait until it is deleted."""
    want = os.environ.get(PAUSE_ENV)
    if not want or want != f"{point}:{step}" or want in _paused:
        return
    _paused.add(want)  # once per process: HF calls the step-end hook again at an epoch end
    marker = Path(output_dir) / ".test-paused"
    marker.write_text(want)
    log.warning("test hook %s=%s: paused until %s is deleted", PAUSE_ENV, want, marker)
    while marker.exists():
        time.sleep(0.05)
