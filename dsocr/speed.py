"""What a training run really achieved: samples/s of the steps it ran, first step, saves, breakdown.

``SpeedMeter`` is a ``TrainerCallback`` that ``OCRTrainer`` always adds. It only reads the host clock at
step ends (no device synchronisation), so it costs nothing: over a window of many steps the host cannot
run ahead of the GPU by more than a step or two (every logging step reads the loss back), so the window's
rate is the device's rate. HF's ``train_samples_per_second`` divides every step of the schedule, skipped
ones included, by the wall time of this process: a resumed run reports steps it never ran. Ours counts
only the steps this process ran.

Written to ``<output_dir>/speed.json`` at the end of training:

* ``steps_run``, ``samples_run``: optimizer steps and training samples of this process (resume excluded).
* ``first_step_s``: from ``train()`` start to the end of the first optimizer step (compilation, cuDNN
  autotuning, the DataLoader's first batches); ``model_loaded_to_first_step_s`` when the caller gives
  the time the model finished loading.
* ``steady_samples_per_s``: samples per second over the steps after ``warmup_steps`` steps, save time
  excluded (``save_s`` lists each save), and before the profiled steps if any.
* ``breakdown_ms`` (only with ``DSOCR_PROFILE_STEPS=A:B``): per-phase mean over steps A..B-1, measured
  with a device synchronisation at each phase boundary (so those steps run slower than the others):
  ``between_steps`` (fetching the next batch from the DataLoader, logging, Trainer bookkeeping),
  ``to_device`` (step start to the forward call: the host-to-device copy), ``forward``, ``backward``
  (includes gradient clipping), ``optimizer``, ``after_optimizer`` (scheduler, zero_grad). The same steps
  are recorded by ``torch.profiler`` and its top operators written to ``profile_ops.txt``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)
PROFILE_ENV = "DSOCR_PROFILE_STEPS"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SpeedMeter(TrainerCallback):
    """Host-clock throughput of the steps this process runs; optional synchronised per-phase breakdown.

    Args:
        samples_per_step: The effective batch (micro-batch x accumulation x processes).
        warmup_steps: Steps left out of the steady rate.
        model_loaded_at: ``time.perf_counter()`` when the model finished loading, if known.
    """

    def __init__(self, samples_per_step: int, warmup_steps: int = 5, model_loaded_at: float | None = None):
        self.samples_per_step = samples_per_step
        self.warmup_steps = warmup_steps
        self.model_loaded_at = model_loaded_at
        self.train_start: float | None = None
        self.step_ends: list[tuple[int, float]] = []  # (global_step, time) for each step run here
        self.saves: list[tuple[int, float, float]] = []  # (step, start, end)
        self._save_started: float | None = None
        self.profile = self._profile_range()
        self.phases: dict[str, list[float]] = {}
        self._marks: dict[str, float] = {}
        self._hooks = []
        self._profiler = None

    @staticmethod
    def _profile_range() -> tuple[int, int] | None:
        spec = os.environ.get(PROFILE_ENV)
        if not spec:
            return None
        try:
            a, b = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"{PROFILE_ENV}={spec!r}: expected A:B, the first and one-past-last step to profile, "
                             "e.g. 20:30") from None
        if not 0 < a < b:
            raise ValueError(f"{PROFILE_ENV}={spec!r}: need 0 < A < B")
        return a, b

    def _profiling(self, step: int) -> bool:
        """Whether the step that is now running (``global_step`` + 1) is profiled."""
        return self.profile is not None and self.profile[0] <= step + 1 < self.profile[1]

    def _mark(self, name: str) -> None:
        _sync()
        self._marks[name] = time.perf_counter()

    def _add(self, phase: str, start: str, end: str) -> None:
        if start in self._marks and end in self._marks:
            self.phases.setdefault(phase, []).append(1000 * (self._marks[end] - self._marks[start]))

    # ---------------------------------------------------------------- callback events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Start the clock; in profile mode, hook the model's forward."""
        self.train_start = time.perf_counter()
        self.first_step = state.global_step  # > 0 after a resume
        if self.profile is not None and model is not None:
            self._hooks = [
                model.register_forward_pre_hook(lambda m, a: self._on_forward("forward_start")),
                model.register_forward_hook(lambda m, a, o: self._on_forward("forward_end")),
            ]

    def _on_forward(self, name: str) -> None:
        if self._profiling(self._current_step):
            self._mark(name)

    def on_step_begin(self, args, state, control, **kwargs):
        """Phase boundary: the batch is here."""
        self._current_step = state.global_step
        if self._profiling(state.global_step):
            if self._profiler is None and state.global_step + 1 == self.profile[0]:
                self._profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                self._profiler.__enter__()
            self._mark("step_begin")
            self._add("between_steps", "step_end", "step_begin")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Phase boundary: gradients are complete (and clipped)."""
        if self._profiling(state.global_step):
            self._mark("pre_optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Phase boundary: the optimizer stepped."""
        if self._profiling(state.global_step):
            self._mark("optimizer_done")

    def on_step_end(self, args, state, control, **kwargs):
        """Record the step's end time (host clock); close the profiled phases."""
        now = time.perf_counter()
        self.step_ends.append((state.global_step, now))
        if self._profiling(state.global_step - 1):
            self._mark("step_end")
            self._add("to_device", "step_begin", "forward_start")
            self._add("forward", "forward_start", "forward_end")
            self._add("backward", "forward_end", "pre_optimizer")
            self._add("optimizer", "pre_optimizer", "optimizer_done")
            self._add("after_optimizer", "optimizer_done", "step_end")
            if self.profile is not None and state.global_step + 1 == self.profile[1]:
                self._stop_profiler(args.output_dir)
        if should_save(control):
            self._save_started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint was written: its duration is left out of the steady rate."""
        start = self._save_started if self._save_started is not None else time.perf_counter()
        self.saves.append((state.global_step, start, time.perf_counter()))
        self._save_started = None

    def _stop_profiler(self, output_dir: str) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        averages = self._profiler.key_averages()
        # Two views: by device time (what the GPU does) and by host self time (a step the GPU waits for is
        # bound by the Python and dispatch work of the second table).
        tables = []
        if torch.cuda.is_available():
            tables.append("# by device time\n" + averages.table(sort_by="cuda_time_total", row_limit=40))
        tables.append("# by host self time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40))
        Path(output_dir, "profile_ops.txt").write_text("\n\n".join(tables), encoding="utf-8")
        self._profiler = None

    def on_train_end(self, args, state, control, **kwargs):
        """Write ``speed.json`` and log the true rate."""
        for h in self._hooks:
            h.remove()
        self._stop_profiler(args.output_dir)
        report = self.report()
        if args.should_save:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Path(args.output_dir, "speed.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        if report["steps_run"]:
            log.info("this process ran %d optimizer steps (%d samples): %s samples/s steady (after %d warm-up "
                     "steps, saves excluded), first step after %.1f s", report["steps_run"], report["samples_run"],
                     report["steady_samples_per_s"], self.warmup_steps, report["first_step_s"])

    # ---------------------------------------------------------------- the numbers

    def report(self) -> dict:
        """The figures written to ``speed.json`` (see the module docstring)."""
        out: dict = {"steps_run": len(self.step_ends), "samples_run": len(self.step_ends) * self.samples_per_step,
                     "samples_per_step": self.samples_per_step, "warmup_steps": self.warmup_steps,
                     "first_step_s": None, "model_loaded_to_first_step_s": None, "steady_samples_per_s": None,
                     "steady_step_s": None, "save_s": [round(e - s, 3) for _, s, e in self.saves]}
        if not self.step_ends or self.train_start is None:
            return out
        first_end = self.step_ends[0][1]
        out["first_step_s"] = round(first_end - self.train_start, 3)
        if self.model_loaded_at is not None:
            out["model_loaded_to_first_step_s"] = round(first_end - self.model_loaded_at, 3)
        # Steady window: from the end of the warm-up steps to the last step, minus the saves inside it.
        ends = self.step_ends
        if self.profile is not None:  # synchronised, profiled steps are slower: the window stops before them
            ends = [(step, t) for step, t in ends if step < self.profile[0]]
        if len(ends) > self.warmup_steps + 1:
            (_, t0), (_, t1) = ends[self.warmup_steps], ends[-1]
            saved = sum(e - s for _, s, e in self.saves if s >= t0 and e <= t1)
            steps = len(ends) - 1 - self.warmup_steps
            seconds = (t1 - t0) - saved
            if seconds > 0:
                out["steady_samples_per_s"] = round(steps * self.samples_per_step / seconds, 3)
                out["steady_step_s"] = round(seconds / steps, 4)
        if self.phases:
            out["breakdown_ms"] = {k: round(statistics.fmean(v), 2) for k, v in self.phases.items()}
            out["breakdown_steps"] = list(self.profile)
        return out


def should_save(control) -> bool:
    """Whether the Trainer will save right after this step end (its ``TrainerControl`` flag)."""
    return bool(getattr(control, "should_save", False))
