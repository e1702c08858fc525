"""Evaluation uses each checkpoint's own settings, refuses to guess, and runs in the weights' dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAMILIES

from dsocr.config import load_saved_config, save_config
from eval import eval_cer, eval_ppl
from train import train_lora

ONE_STEP = ["training.max_steps=1", "training.save_steps=1", "training.eval_strategy=no",
            "training.per_device_train_batch_size=2", "data.max_train_samples=4", "training.warmup_steps=0"]


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    """``family -> checkpoint-1`` of a one-step run of the tiny model (made on demand)."""
    made = {}

    def get(family: str):
        if family not in made:
            train_lora.main(tiny_cfg(family, *ONE_STEP, f"output_dir={tmp_path / family}"))
            made[family] = tmp_path / family / "checkpoint-1"
        return made[family]

    return get


def test_each_checkpoint_is_prompted_with_its_own_instruction(trained, tmp_path, monkeypatch):
    a = trained("deepseek_ocr_v1")
    b = tmp_path / "other_prompt"
    shutil.copytree(a, b)
    cfg = load_saved_config(b)
    cfg.collator.instruction = "<image>\nOCR this line."
    save_config(cfg, b)

    import dsocr.generation

    seen = []
    real = dsocr.generation.generate_batched

    def spy(model, collator, records, *args, **kwargs):
        seen.append({r["messages"][0]["content"] for r in records})
        return real(model, collator, records, *args, **kwargs)

    monkeypatch.setattr(dsocr.generation, "generate_batched", spy)
    out = tmp_path / "cmp"
    eval_cer.main(["--ckpt", str(a), "--ckpt", str(b), "--name", "a", "--name", "b", "--out", str(out),
                   "eval.max_samples=3", "eval.max_new_tokens=4"])
    assert seen == [{"<image>\nFree OCR."}, {"<image>\nOCR this line."}]
    assert json.loads((out / "b" / "metrics.json").read_text())["instruction"] == "<image>\nOCR this line."
    assert json.loads((out / "a" / "metrics.json").read_text())["instruction"] == "<image>\nFree OCR."


def test_ocr2_without_preprocessor_config_is_an_error(tiny_model_dirs, tmp_path):
    from dsocr.models import get_family

    family = get_family("deepseek_ocr2")
    folder = tmp_path / "ocr2_no_preproc"
    shutil.copytree(tiny_model_dirs("deepseek_ocr2"), folder)
    (folder / "preprocessor_config.json").unlink()
    model = family.load_model(str(folder))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json\) of '.*ocr2_no_preproc'.*To fix: copy"):
        family.image_processor(model, "gundam")


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_runs_with_bf16_weights(family, trained, tmp_path):
    """The GPU recipe's dtype: pixels leave the collator in fp32 and must meet bf16 weights (here on CPU)."""
    ckpt = trained(family)
    common = ["model.dtype=bfloat16", "eval.max_samples=2", "eval.batch_size=2"]
    result = eval_cer.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "cer"), *common, "eval.max_new_tokens=3"])
    assert list(result.values())[0]["n_lines"] == 2
    ppl = eval_ppl.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ppl"), *common])
    assert torch.isfinite(torch.tensor(ppl["total_nll"])) and ppl["target_tokens"] > 0
