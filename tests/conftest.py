"""Shared fixtures: generated data and tiny random-weight models, built once per test session.

Nothing here is mocked: the models are the real classes with shrunken sizes, saved and reloaded
through ``from_pretrained`` with the real (offline-built) tokenizer; the data comes from our generator
in the exact layout of priyank-m/chinese_text_recognition.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("deepseek_ocr_v1", "deepseek_ocr2")
TINY_CONFIG = {"deepseek_ocr_v1": REPO / "configs" / "tiny_cpu.yaml", "deepseek_ocr2": REPO / "configs" / "tiny_cpu_ocr2.yaml"}

# Tests are CPU-only and must not try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


DEMO_SIZES = {"train": 64, "val": 16, "test": 16}
# A machine without CJK fonts (the GPU box) gets the same data generated elsewhere:
#   python -m data.generate --preset demo --out DIR --train 64 --val 16 --test 16 --seed 0
PREBUILT_DATA_ENV = "DSOCR_TEST_DEMO_DATA"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo-preset dataset: train 64, val 16, test 16 lines (or the prebuilt copy named by the env)."""
    if prebuilt := os.environ.get(PREBUILT_DATA_ENV):
        return Path(prebuilt)
    from data.generate import generate

    out = tmp_path_factory.mktemp("demo_data")
    generate(str(out), DEMO_SIZES, seed=0, preset="demo")
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """``family -> folder`` of a tiny random model, made on first use."""
    from dsocr.models.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny(family, root / family, seed=0)
        return cache[family]

    return get


@pytest.fixture
def tiny_cfg(tmp_path, demo_data, tiny_model_dirs):
    """``(family, *overrides) -> RunConfig`` of the shipped tiny config pointed at test folders."""
    from dsocr.config import load_config

    def make(family: str, *overrides: str):
        return load_config(
            TINY_CONFIG[family],
            [f"model.name_or_path={tiny_model_dirs(family)}", f"data.dataset={demo_data}",
             f"output_dir={tmp_path / 'run'}", "training.report_to=[]", *overrides],
        )

    return make


@pytest.fixture(scope="session")
def trained_v1_run(tmp_path_factory, demo_data, tiny_model_dirs) -> Path:
    """A tiny v1 LoRA run that has learnt 8 training lines (60 steps), for the export/predict/app tests.

    Evaluated once, at the end, on 4 validation lines so that its trainer_state.json carries metrics; the
    runs' folder holds checkpoint-60 and final.
    """
    from dsocr.config import load_config
    from train import train_lora

    run = tmp_path_factory.mktemp("trained_v1") / "run"
    cfg = load_config(TINY_CONFIG["deepseek_ocr_v1"], [
        f"model.name_or_path={tiny_model_dirs('deepseek_ocr_v1')}", f"data.dataset={demo_data}", f"output_dir={run}",
        "training.report_to=[]", "data.max_train_samples=8", "data.max_eval_samples=4", "eval.train_cer_samples=4",
        "eval.max_new_tokens=12", "training.max_steps=60", "training.warmup_steps=5", "training.learning_rate=3e-3",
        "training.eval_steps=60", "training.save_steps=60", "training.logging_steps=20", "lora.alpha=32"])
    train_lora.main(cfg)
    return run


@pytest.fixture(scope="session")
def exported_v1(tmp_path_factory, trained_v1_run) -> Path:
    """``infer/export.py --dtype float32`` of the trained tiny v1's checkpoint-60."""
    from infer import export

    out = tmp_path_factory.mktemp("exports") / "v1_f32"
    export.main(["--ckpt", str(trained_v1_run / "checkpoint-60"), "--out", str(out), "--dtype", "float32"])
    return out
