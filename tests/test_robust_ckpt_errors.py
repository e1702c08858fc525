"""Bad ``--ckpt`` folders and bad configs fail at once, naming the path or key and the fix.

Checkpoint folders are built by hand (empty files where content does not matter): every error here is
raised before any model loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG

from dsocr.config import save_config
from eval import eval_cer


def complete(folder: Path, cfg, base: str | None = None) -> Path:
    """A checkpoint as eval needs it: adapter config + weights + run config (weights are not read here)."""
    folder.mkdir(parents=True)
    save_config(cfg, folder)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": base or cfg.model.name_or_path}))
    (folder / "adapter_model.safetensors").write_text("")
    return folder


def eval_error(ckpt: Path | str, *extra: str) -> str:
    with pytest.raises(SystemExit) as e:
        eval_cer.main(["--ckpt", str(ckpt), *extra])
    return str(e.value)


@pytest.fixture
def run(tiny_cfg, tmp_path) -> Path:
    """A run folder (run_config.yaml) with one good checkpoint-2."""
    cfg = tiny_cfg("deepseek_ocr_v1")
    run = tmp_path / "run"
    save_config(cfg, run)
    complete(run / "checkpoint-2", cfg)
    return run


def test_ckpt_that_does_not_exist(run):
    msg = eval_error(run / "checkpoint-7")
    assert f"--ckpt '{run / 'checkpoint-7'}' does not exist. To fix: pass a complete checkpoint folder" in msg


def test_ckpt_is_a_run_folder(run):
    msg = eval_error(run)
    assert f"--ckpt '{run}' is a run folder, not a checkpoint. To fix: pass a complete checkpoint folder of that " \
           f"run: {run / 'checkpoint-2'}" in msg


def test_ckpt_half_written(run):
    no_cfg = run / "checkpoint-4"
    no_cfg.mkdir()
    (no_cfg / "adapter_config.json").write_text("{}")
    msg = eval_error(no_cfg)
    assert f"--ckpt '{no_cfg}' has adapter_config.json but no run_config.yaml: a half-written checkpoint" in msg
    assert f"usable: {run / 'checkpoint-2'}" in msg

    no_weights = run / "checkpoint-6"
    complete(no_weights, eval_cer_cfg(run)).joinpath("adapter_model.safetensors").unlink()
    msg = eval_error(no_weights)
    assert f"--ckpt '{no_weights}' has adapter_config.json but no adapter weights (adapter_model.safetensors or " \
           "adapter_model.bin): a half-written checkpoint. To fix" in msg

    tmp = run / ".tmp-checkpoint-8"  # a save killed before its rename
    complete(tmp, eval_cer_cfg(run))
    msg = eval_error(tmp)
    assert f"--ckpt '{tmp}' is the temporary folder of an interrupted checkpoint save" in msg
    assert f"usable: {run / 'checkpoint-2'}" in msg


def eval_cer_cfg(run: Path):
    from dsocr.config import load_saved_config

    return load_saved_config(run / "checkpoint-2")


def test_ckpt_adapter_of_another_base_model(run):
    other = complete(run / "checkpoint-9", eval_cer_cfg(run), base="some-org/Other-OCR")
    msg = eval_error(other, "eval.max_samples=2")
    assert f"checkpoint '{other}' holds an adapter trained on base model 'some-org/Other-OCR'" in msg
    assert "To fix: add the override model.name_or_path=some-org/Other-OCR" in msg


def test_several_bad_ckpts_reported_together(run):
    msg = eval_error(run / "nope", "--ckpt", str(run))
    assert "does not exist" in msg and "is a run folder" in msg


def test_eval_override_with_wrong_type(run):
    msg = eval_error(run / "checkpoint-2", "eval.batch_size=big")
    assert msg.startswith("error: ") and "eval.batch_size" in msg and "big" in msg


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train/train_lora.py", "--config", str(TINY_CONFIG["deepseek_ocr_v1"]),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_and_wrong_type(tmp_path):
    out = f"output_dir={tmp_path / 'run'}"
    p = cli(out, "lora.rank=8", "lora.alpah=16")
    assert p.returncode == 1
    assert "unknown key 'lora.rank'" in p.stderr and "valid keys in lora: r, alpha, dropout, target_modules" in p.stderr
    assert "unknown key 'lora.alpah' (did you mean 'lora.alpha'?)" in p.stderr  # all problems at once
    p = cli(out, "lora.r=eight")
    assert p.returncode == 1 and "lora.r" in p.stderr and "eight" in p.stderr, p.stderr
    p = cli(out, "--lr", "1e-4")
    assert p.returncode == 1 and "use key=value, e.g. training.learning_rate=1e-4" in p.stderr
    assert not (tmp_path / "run").exists()  # nothing was created for a run that cannot start
