"""SIGTERM/SIGINT during training: checkpoint at the end of the current step, clean exit, exact resume.

The run is paused at the end of optimizer step 3 with the ``OCR_TEST_PAUSE`` hook, signalled there, then
released: the signal lands at a known step instead of wherever a timer happens to hit.
"""

from __future__ import annotations

import signal
import time

from test_robust_resume import (
    assert_same_adapter,
    console,
    finish,
    losses,
    overrides,
    reference_run,
    start,
    steps,
    wait_paused,
)

from dsocr.checkpointing import EXIT_INTERRUPTED, is_complete_checkpoint


def test_sigterm_saves_current_step_exits_75_and_resumes_bitwise(demo_data, tiny_model_dirs, tmp_path,
                                                                 tmp_path_factory):
    reference = reference_run(tmp_path_factory, demo_data, tiny_model_dirs)
    out = tmp_path / "run"
    proc = start(overrides(demo_data, tiny_model_dirs, out), out, pause="step:3")
    wait_paused(proc, out)
    proc.send_signal(signal.SIGTERM)
    (out / ".test-paused").unlink()  # let step 3 finish: its log/save, then ours
    assert proc.wait(120) == EXIT_INTERRUPTED, console(out)[-3000:]
    log = console(out)
    # checkpoint-3 is off the save_steps=2 schedule: it exists because of the signal, and is complete.
    assert steps(out) == [2, 3] and is_complete_checkpoint(out / "checkpoint-3")[0]
    assert "SIGTERM received: saving a checkpoint at the end of the current optimizer step" in log
    assert f"stopped by SIGTERM at step 3; saved {out / 'checkpoint-3'}. To resume:" in log
    assert "resume_from_checkpoint=latest" in log
    assert not (out / "final").exists()  # a partial run publishes no final adapter

    log = finish(overrides(demo_data, tiny_model_dirs, out, "resume_from_checkpoint=latest"), out)
    assert f"resume_from_checkpoint=latest -> {out / 'checkpoint-3'}" in log
    assert_same_adapter(out / "checkpoint-6", reference / "checkpoint-6")
    assert_same_adapter(out / "final", reference / "final")
    assert losses(out, 6) == losses(reference, 6)


def test_second_signal_exits_at_once(demo_data, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    proc = start(overrides(demo_data, tiny_model_dirs, out), out, pause="step:3")
    wait_paused(proc, out)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "SIGTERM received" not in console(out):  # one at a time: Python runs pending handlers by number
        assert time.monotonic() < deadline and proc.poll() is None, console(out)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # still paused: it never reaches the end of step 3
    assert proc.wait(30) == 128 + signal.SIGINT
    assert "second SIGINT: exiting now without saving" in console(out)
    assert steps(out) == [2] and not list(out.glob(".tmp-*"))  # the last scheduled checkpoint is intact
