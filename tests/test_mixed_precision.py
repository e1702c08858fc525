"""Under autocast the LoRA inputs skip PEFT's float32 round trip during a training step, with the same numbers."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dsocr.mixed_precision import LoraInputCasts
from train import train_lora


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora_bf16_with_fp32_adapter():
    torch.manual_seed(0)
    model = get_peft_model(_Net().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.1)  # lora_B starts at zero: give the LoRA term a value
    return model


class _FloatCopies(TorchDispatchMode):
    """Counts ``_to_copy`` calls that turn a bf16 tensor of the activations' batch size into float32."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.count = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32
                and args[0].dtype == torch.bfloat16 and args[0].shape[0] == self.rows):
            self.count += 1
        return func(*args, **kwargs)


def _step(model, x, casts_off: bool):
    model.zero_grad(set_to_none=True)
    copies = _FloatCopies(x.shape[0])
    with copies, torch.autocast("cpu", dtype=torch.bfloat16):
        if casts_off:
            with LoraInputCasts(model):
                out = model(x)
        else:
            out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, copies.count


def test_casts_off_gives_the_same_outputs_and_gradients_without_float32_copies():
    model = _lora_bf16_with_fp32_adapter()
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    out_on, grads_on, copies_on = _step(model, x, casts_off=False)
    out_off, grads_off, copies_off = _step(model, x, casts_off=True)
    assert copies_on >= 2  # PEFT's float32 copy of each LoRA layer's input
    assert copies_off == 0
    assert torch.equal(out_on, out_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


def test_leaving_restores_peft_casting():
    model = _lora_bf16_with_fp32_adapter()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].cast_input_dtype_enabled = False  # a layer the user had switched off stays off
    with LoraInputCasts(model) as casts:
        assert len(casts.layers) == len(layers) == 2
        assert not any(layer.cast_input_dtype_enabled for layer in layers)
    assert [layer.cast_input_dtype_enabled for layer in layers] == [False, True]
    layers[0].cast_input_dtype_enabled = True
    # Outside the step a bf16 input must still reach the float32 adapter as float32 (no autocast there).
    out = model(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_bf16_training_steps_run_with_casts_off_and_restore_them(tiny_cfg, monkeypatch):
    """Through train_lora.py with bf16 autocast on CPU: inside each training step the LoRA layers do not cast,
    after ``train()`` they do again."""
    from dsocr.trainer import OCRTrainer

    seen: list[bool] = []
    trainers: list[OCRTrainer] = []
    original = OCRTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        trainers.append(self)
        layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        seen.append(getattr(layer, "cast_input_dtype_enabled", True))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(OCRTrainer, "compute_loss", compute_loss)
    metrics = train_lora.main(tiny_cfg("deepseek_ocr_v1", "model.dtype=bfloat16", "training.bf16=true",
                                       "training.per_device_train_batch_size=2", "training.eval_strategy=no",
                                       "training.save_strategy=no", "data.max_train_samples=8",
                                       "training.max_steps=3"))
    assert seen == [False, False, False]
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    model = trainers[0].model
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules() if isinstance(m, BaseTunerLayer))
