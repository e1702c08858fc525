"""``speed.json``: the steps a process really ran, their rate without saves, and the profiled breakdown."""

from __future__ import annotations

import json
import shutil

from train import train_lora

RUN = ["training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.logging_steps=1",
       "data.max_train_samples=16", "training.warmup_steps=0", "training.max_steps=10", "training.save_steps=4"]
# (steps 1-5 warm up, 6-8 are the steady window, 9-10 are profiled)


def test_speed_report_counts_steps_run_excludes_saves_and_profiles(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DSOCR_PROFILE_STEPS", "9:11")
    metrics = train_lora.main(tiny_cfg("deepseek_ocr_v1", *RUN))
    run = tmp_path / "run"
    speed = json.loads((run / "speed.json").read_text())
    assert (speed["steps_run"], speed["samples_run"], speed["samples_per_step"]) == (10, 20, 2)
    assert len(speed["save_s"]) == 3 and all(s > 0 for s in speed["save_s"])  # steps 4, 8 and the last
    assert speed["steady_samples_per_s"] > 0 and speed["first_step_s"] > 0
    assert speed["model_loaded_to_first_step_s"] >= speed["first_step_s"]
    assert set(speed["breakdown_ms"]) == {"between_steps", "to_device", "forward", "backward", "optimizer",
                                          "after_optimizer"}
    assert speed["breakdown_steps"] == [9, 11]
    assert "Name" in (run / "profile_ops.txt").read_text()
    assert metrics["speed_steps_run"] == 10


def test_resumed_run_reports_only_the_steps_it_ran(tiny_cfg, tmp_path):
    train_lora.main(tiny_cfg("deepseek_ocr_v1", *RUN))  # 10 steps, checkpoints at 4 and 8
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-4", resumed / "checkpoint-4")
    metrics = train_lora.main(tiny_cfg("deepseek_ocr_v1", *RUN, f"output_dir={resumed}",
                                       "resume_from_checkpoint=latest"))
    speed = json.loads((resumed / "speed.json").read_text())
    assert (speed["steps_run"], speed["samples_run"]) == (6, 12)
    # HF's figure divides all 10 scheduled steps' samples by this process's time: 10/6 of the true count.
    hf_samples = metrics["train_samples_per_second"] * metrics["train_runtime"]
    assert hf_samples > 1.5 * speed["samples_run"]
