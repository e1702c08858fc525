"""Full fine-tuning as a run setting, float32 master weights, fp16 rules and gradient checkpointing.

Fast tier: what ``prepare_training`` makes trainable and in which dtype, the config's precision rules,
and gradient checkpointing giving the same loss and gradients as plain backprop (LoRA and full, v1 and
OCR-2). Slow tier: full fine-tuning of the tiny v1 memorises 8 lines to CER 0 through ``train_lora.main``
and resumes bit for bit. GPU tier: fp16 mixed precision (loss scaling, LoRA weights in float32).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file

from dsocr.adapters import part_of, prepare_training
from dsocr.config import ConfigError
from dsocr.loading import load_base


def _trainable(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_default_trains_language_model_and_projector_only(family, tiny_cfg):
    loaded = load_base(tiny_cfg(family, "finetune.method=full"))
    n = prepare_training(loaded)
    parts = {part_of(name, loaded.family) for name in _trainable(loaded.model)}
    assert parts == {"language_model", "projector"}
    frozen = {part_of(name, loaded.family) for name, p in loaded.model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision"}
    assert n == sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())  # no adapter at all


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_trains_float32_master_weights(family, tiny_cfg):
    """Whatever trains (full parts, LoRA, LoRA's modules_to_save copies) is float32; frozen weights stay bf16."""
    bf16 = ["model.dtype=bfloat16", "training.bf16=true"]
    full = load_base(tiny_cfg(family, "finetune.method=full", "finetune.train=[language_model]", *bf16))
    prepare_training(full)
    assert set(_trainable(full.model).values()) == {torch.float32}
    frozen = {p.dtype for p in full.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}

    lora = load_base(tiny_cfg(family, "model.train_vision=true", *bf16))
    prepare_training(lora)
    trainable = _trainable(lora.model)
    assert any("modules_to_save" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in lora.model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.dtype=float16"], "model.dtype float16 needs training.fp16=true"),
    (["model.dtype=bfloat16", "finetune.method=full"], "needs training.bf16=true"),
    (["finetune.train=[language_model]"], "to train its weights in full set finetune.method=full"),
    (["finetune.method=full", "finetune.train=[]"], "trains nothing"),
    (["finetune.method=partial"], "finetune.method 'partial' is not one of lora, full"),
    (["finetune.method=full", "finetune.train=[towers]"], "is not a subset of language_model, projector, vision"),
])
def test_finetune_and_precision_rules_fail_before_loading(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_cfg("deepseek_ocr_v1", *overrides)


def test_float16_with_fp16_is_accepted(tiny_cfg):
    cfg = tiny_cfg("deepseek_ocr_v1", "model.dtype=float16", "training.fp16=true")
    assert cfg.model.dtype == "float16"


def _batch(loaded, n: int = 2):
    from dsocr.datasets import load_conversations

    conv = load_conversations(loaded.cfg, "train", n)
    return loaded.make_collator(train=True)([conv[i] for i in range(n)])


def test_make_tiny_leaves_the_global_rng_alone(tmp_path):
    """Building a tiny model (the tests' fixtures do it on first use) does not move the caller's torch RNG.

    One family suffices: both go through ``make_tiny``; OCR-2's tiny model builds in about a second.
    """
    from dsocr.models.make_tiny import make_tiny

    torch.manual_seed(123)
    before = torch.get_rng_state()
    make_tiny("deepseek_ocr2", tmp_path / "ocr2", seed=0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(("family", "method"), [
    ("deepseek_ocr_v1", "full"),
    ("deepseek_ocr2", "lora"),
    pytest.param("deepseek_ocr_v1", "lora", marks=pytest.mark.slow),  # also tests/test_v1_model.py
    pytest.param("deepseek_ocr2", "full", marks=pytest.mark.slow),
])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, method, tiny_cfg):
    """One forward/backward with and without checkpointing (non-reentrant, as HF's default): same numbers.

    Both runs start from the same weights, asserted: the config is built once (its first use in a session
    makes the tiny model) and the seed is set right before the LoRA matrices are drawn, as ``train_lora``
    does. LoRA's B matrices get small random values (a fixed generator), so that the adapter changes the
    recomputed forward and its A matrices get gradients too (at B = 0 they are 0 in both runs).
    """
    cfg = tiny_cfg(family, f"finetune.method={method}", "lora.dropout=0.0")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        loaded = load_base(cfg)
        prepare_training(loaded)
        model = loaded.model
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        out = model(**_batch(loaded), use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((start, float(out.loss.detach()), grads))
    (start_a, loss_a, grads_a), (start_b, loss_b, grads_b) = results
    assert start_a.keys() == start_b.keys()
    assert [k for k in start_a if not torch.equal(start_a[k], start_b[k])] == []
    assert grads_a and grads_a.keys() == grads_b.keys()
    if method == "lora":
        assert all(float(grads_a[k].abs().max()) > 0 for k in grads_a if "lora_A" in k)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    # Relative to each gradient's scale: the recomputed forward is the same arithmetic, only the order of
    # some accumulations in the backward differs (fp32: ~1e-7 relative).
    worst = max((float((grads_a[k] - grads_b[k]).abs().max()) / (float(grads_a[k].abs().max()) + 1e-12), k)
                for k in grads_a)
    assert worst[0] <= 1e-4, (worst, loss_a, loss_b)


FULL = ["finetune.method=full", "data.max_train_samples=8", "data.eval_split=train", "data.max_eval_samples=8",
        "eval.train_cer_samples=8", "eval.max_new_tokens=12", "training.per_device_train_batch_size=8",
        "training.max_steps=40", "training.warmup_steps=2", "training.learning_rate=1e-3", "training.eval_steps=40",
        "training.save_steps=20", "training.logging_steps=5", "training.save_total_limit=2",
        "training.metric_for_best_model=eval_loss"]


@pytest.mark.slow
def test_full_finetuning_memorises_lines_and_resumes_exactly(tiny_cfg, tmp_path):
    """8 training lines, evaluated on themselves: CER 0 after 40 steps; resumed from step 20, the same model."""
    from train import train_lora

    metrics = train_lora.main(tiny_cfg("deepseek_ocr_v1", *FULL, f"output_dir={tmp_path / 'a'}"))
    assert metrics["eval_cer"] == 0.0 and metrics["eval_line_acc"] == 1.0, metrics
    a = tmp_path / "a"
    assert (a / "final" / "model.safetensors").is_file() and not (a / "final" / "adapter_config.json").exists()
    resumed = train_lora.main(tiny_cfg("deepseek_ocr_v1", *FULL, f"output_dir={tmp_path / 'b'}",
                                       f"resume_from_checkpoint={a / 'checkpoint-20'}"))
    assert resumed["eval_cer"] == 0.0
    ta, tb = load_file(str(a / "final" / "model.safetensors")), load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    hist = lambda d: [(e["step"], e["loss"]) for e in json.loads((d / "checkpoint-40" / "trainer_state.json").read_text())["log_history"] if "loss" in e]  # noqa: E731
    assert hist(tmp_path / "b") == hist(a)

    from dsocr.loading import load_for_eval  # the shared path of eval_cer.py / eval_ppl.py
    loaded = load_for_eval(str(a / "final"), device=torch.device("cpu"))
    assert loaded.cfg.finetune.method == "full" and loaded.adapter is None


@pytest.mark.gpu
def test_fp16_lora_trains_with_loss_scaling_and_float32_adapter(tiny_cfg, tmp_path):
    """model.dtype=float16 + training.fp16: the adapter is float32, the GradScaler state is checkpointed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (fp16 mixed precision is a GPU mode)")
    from train import train_lora

    out = tmp_path / "fp16"
    cfg = tiny_cfg("deepseek_ocr_v1", "model.dtype=float16", "training.fp16=true", "training.use_cpu=false",
                   "data.max_train_samples=8", "training.per_device_train_batch_size=4", "training.max_steps=20",
                   "training.warmup_steps=2", "training.save_steps=20", "training.eval_steps=20",
                   "training.logging_steps=5", "eval.train_cer_samples=0", "training.metric_for_best_model=eval_loss",
                   f"output_dir={out}")
    metrics = train_lora.main(cfg)
    losses = [e["loss"] for e in json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert (out / "checkpoint-20" / "scaler.pt").is_file()  # loss scaling was on and is resumed
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert math.isfinite(metrics["eval_loss"]), metrics["eval_loss"]
