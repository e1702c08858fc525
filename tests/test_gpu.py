"""GPU tier (``pytest -m gpu``): every family trains, checkpoints and evaluates in bf16 on CUDA.

Tiny random models, the shipped tiny configs moved to the GPU: training with evaluation before and during
training (bf16 autocast through the Trainer), a checkpoint, then ``eval_cer.py`` and ``eval_ppl.py`` on that
checkpoint with bf16 weights (no autocast: the path that crashed OCR-2 with float pixels).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES

from eval import eval_cer, eval_ppl
from train import train_lora

pytestmark = pytest.mark.gpu

GPU = ["training.use_cpu=false", "training.bf16=true", "model.dtype=bfloat16", "training.max_steps=4",
       "training.save_steps=2", "training.eval_steps=2", "training.per_device_train_batch_size=4",
       "training.per_device_eval_batch_size=4", "data.max_train_samples=16", "data.max_eval_samples=4",
       "eval.train_cer_samples=4", "eval.batch_size=4", "training.warmup_steps=1", "training.logging_steps=1"]


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_train_evaluate_checkpoint_on_cuda(family, tiny_cfg, tmp_path):
    metrics = train_lora.main(tiny_cfg(family, *GPU))
    for key in ("eval_before_cer", "eval_cer", "eval_perplexity"):
        assert key in metrics, key
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["peak_gpu_gib"] > 0
    ckpt = tmp_path / "run" / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    cer = eval_cer.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "cer"), "eval.max_samples=8", "eval.batch_size=4"])
    corpus = list(cer.values())[0]
    assert corpus["n_lines"] == 8 and corpus["device"].startswith("cuda")
    ppl = eval_ppl.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ppl"), "eval.max_samples=8"])
    assert ppl["target_tokens"] > 0 and ppl["perplexity"] == ppl["perplexity"]
