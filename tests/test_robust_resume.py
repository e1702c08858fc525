"""Kill training at the worst moments, resume with ``latest``, and end bit-for-bit where an uninterrupted run ends.

The training script runs as a real subprocess, SIGKILLed (no handler, no cleanup: what an OOM killer or a
preempted node does) at exact places chosen with the ``OCR_TEST_PAUSE`` hook of dsocr/checkpointing.py:
the run pauses there, writes ``<run>/.test-paused``, and the test kills it. No timers, no races.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CONFIG
from safetensors.torch import load_file

from dsocr.checkpointing import PAUSE_ENV, rotate
from dsocr.checkpoints import CheckpointError, is_complete_checkpoint, list_checkpoints, plan_resume

# 6 optimizer steps of batch 2 over 8 lines (a second epoch starts after step 4), a checkpoint every 2
# steps, at most 2 kept. Evaluation is on (so a fresh run evaluates before step 1, a resumed one does
# not) but not during training, and CER generation is off: it costs seconds and runs under the same RNG
# guard as the loss.
RUN = ["training.report_to=[]", "training.per_device_train_batch_size=2", "training.per_device_eval_batch_size=2",
       "training.warmup_steps=1", "training.logging_steps=1", "data.max_train_samples=8", "data.max_eval_samples=2",
       "eval.train_cer_samples=0", "training.metric_for_best_model=eval_loss", "training.max_steps=6", "training.save_steps=2", "training.eval_steps=100",
       "training.save_total_limit=2"]


def overrides(demo_data, tiny_model_dirs, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={tiny_model_dirs('deepseek_ocr_v1')}", f"data.dataset={demo_data}",
            f"output_dir={out}", *RUN, *extra]


def start(args: list[str], out: Path, pause: str | None = None) -> subprocess.Popen:
    """``python train/train_lora.py --config tiny_cpu.yaml ARGS`` with its console going to ``out``.log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(list(out.parent.glob(f"{out.name}.*.log")))
    console = open(out.parent / f"{out.name}.{n}.log", "w")  # noqa: SIM115 - closed by the child's exit
    cmd = [sys.executable, "train/train_lora.py", "--config", str(TINY_CONFIG["deepseek_ocr_v1"]), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)


def console(out: Path) -> str:
    """The newest console log of the runs into ``out``."""
    logs = sorted(out.parent.glob(f"{out.name}.*.log"), key=lambda p: int(p.name.split(".")[-2]))
    return logs[-1].read_text(errors="replace")


def wait_paused(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Block until the run reached its ``OCR_TEST_PAUSE`` point."""
    marker = out / ".test-paused"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"run exited ({proc.returncode}) before pausing:\n{console(out)[-3000:]}"
        assert time.monotonic() < deadline, f"no pause after {timeout}s:\n{console(out)[-3000:]}"
        time.sleep(0.05)


def kill_at(args: list[str], out: Path, pause: str) -> None:
    """Run until ``pause``, then SIGKILL."""
    proc = start(args, out, pause)
    wait_paused(proc, out)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    (out / ".test-paused").unlink()


def finish(args: list[str], out: Path, expect: int = 0, timeout: float = 180) -> str:
    proc = start(args, out)
    rc = proc.wait(timeout)
    text = console(out)
    assert rc == expect, f"exit {rc}, expected {expect}:\n{text[-3000:]}"
    return text


def assert_same_adapter(a: Path, b: Path) -> None:
    """Every tensor of ``adapter_model.safetensors`` bit-for-bit equal (``torch.equal``)."""
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ between {a} and {b}, e.g. {differ[:3]}"


def steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(out)]


def reference_run(tmp_path_factory, demo_data, tiny_model_dirs) -> Path:
    """The uninterrupted run (fresh: it also runs main()'s eval-before, which resumed runs skip).

    Made once per test session and shared by the resume and signal tests.
    """
    out = tmp_path_factory.getbasetemp() / "robust_reference" / "run"
    if not (out / "final" / "adapter_model.safetensors").is_file():
        finish(overrides(demo_data, tiny_model_dirs, out), out)
    return out


@pytest.fixture
def reference(tmp_path_factory, demo_data, tiny_model_dirs) -> Path:
    return reference_run(tmp_path_factory, demo_data, tiny_model_dirs)


def losses(run: Path, step: int) -> list[tuple[int, float]]:
    hist = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e["loss"]) for e in hist if "loss" in e]


def test_sigkill_anywhere_then_latest_resumes_bitwise(reference, demo_data, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    fresh = overrides(demo_data, tiny_model_dirs, out)
    resume = overrides(demo_data, tiny_model_dirs, out, "resume_from_checkpoint=latest")

    # 1. Killed after optimizer step 3, between checkpoints: step 3 is lost, checkpoint-2 is intact.
    kill_at(fresh, out, "step:3")
    assert steps(out) == [2] and is_complete_checkpoint(out / "checkpoint-2")[0]

    # 2. Resumed from 2 (mid-epoch: HF skips consumed batches), killed in the middle of writing
    #    checkpoint-4 (adapter written, optimizer not yet): only a .tmp folder holds it.
    kill_at(resume, out, "save:4")
    assert steps(out) == [2]
    assert (out / ".tmp-checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (out / ".tmp-checkpoint-4" / "optimizer.pt").exists()

    # 3. Resumed from 2 again (the .tmp is named in the log, then removed), killed right after
    #    checkpoint-4 was published.
    kill_at(resume, out, "saved:4")
    log = console(out)
    assert f"ignoring {out / '.tmp-checkpoint-4'}: a checkpoint save or rotation that was interrupted" in log
    assert f"resume_from_checkpoint=latest -> {out / 'checkpoint-2'}" in log
    assert steps(out) == [2, 4] and not (out / ".tmp-checkpoint-4").exists()

    # 4. Resumed from 4 (an epoch boundary) to the end: the same adapter, the same losses.
    log = finish(resume, out)
    assert f"resume_from_checkpoint=latest -> {out / 'checkpoint-4'}" in log
    assert steps(out) == [4, 6] == steps(reference)  # save_total_limit=2 held throughout
    assert_same_adapter(out / "checkpoint-6", reference / "checkpoint-6")
    assert_same_adapter(out / "final", reference / "final")
    assert losses(out, 6) == losses(reference, 6) and len(losses(out, 6)) == 6


# ---------------------------------------------------------------- no training needed below


def fake_checkpoint(folder: Path, missing: tuple[str, ...] = ()) -> Path:
    """A folder with the files ``is_complete_checkpoint`` looks for (empty), minus ``missing``."""
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt",
                 "scheduler.pt", "run_config.yaml", "rng_state.pth"):
        if name not in missing:
            (folder / name).write_text("")
    if "trainer_state.json" not in missing:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[-1])}))
    return folder


def test_latest_skips_incomplete_and_temporaries_with_reasons(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-4", missing=("optimizer.pt",))
    fake_checkpoint(tmp_path / "checkpoint-5", missing=("run_config.yaml", "rng_state.pth"))
    fake_checkpoint(tmp_path / ".tmp-checkpoint-6")
    with caplog.at_level(logging.INFO):
        assert plan_resume("latest", tmp_path).checkpoint == str(tmp_path / "checkpoint-2")
    text = caplog.text
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-5'} (missing: run_config.yaml, rng_state.pth)" in text
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-4'} (missing: optimizer.pt)" in text
    assert f"ignoring {tmp_path / '.tmp-checkpoint-6'}: a checkpoint save or rotation that was interrupted" in text

    with pytest.raises(CheckpointError, match=r"missing: optimizer\.pt\). To fix"):
        plan_resume(str(tmp_path / "checkpoint-4"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"'{empty}' holds no complete checkpoint-N folder"):
        plan_resume("latest", empty)


def test_auto_resumes_when_there_is_a_checkpoint_else_starts_fresh(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = plan_resume("auto", empty, max_steps=10)
    assert (plan.checkpoint, plan.finished) == (None, False) and "starting a fresh run" in plan.reason
    fake_checkpoint(tmp_path / "checkpoint-4")
    plan = plan_resume("auto", tmp_path, max_steps=10)
    assert (plan.checkpoint, plan.finished) == (str(tmp_path / "checkpoint-4"), False)
    plan = plan_resume("auto", tmp_path, max_steps=4)
    assert plan.finished and "nothing to train" in plan.reason


def test_rotation_never_deletes_last_complete_or_best(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path / f"checkpoint-{step}")
    fake_checkpoint(tmp_path / "checkpoint-8", missing=("optimizer.pt",))  # newest, but not resumable
    # HF would keep only checkpoint-8 with limit 1; we also keep 6, the only one resume can use.
    rotate(tmp_path, limit=1, best=None)
    assert steps(tmp_path) == [6, 8]
    fake_checkpoint(tmp_path / "checkpoint-10")
    rotate(tmp_path, limit=2, best=str(tmp_path / "checkpoint-6"))  # best survives, oldest non-best goes
    assert steps(tmp_path) == [6, 10]
    assert not list(tmp_path.glob(".trash-*"))
