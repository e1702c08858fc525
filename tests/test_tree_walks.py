"""The training loop's module-tree walks happen once per run, not once per step, with the same effect."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from dsocr.tree_walks import FixedTree
from train import train_lora


def _tree() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 2)))


@pytest.fixture
def class_calls(monkeypatch):
    """Counts of calls that reach ``nn.Module.train`` / ``nn.Module.zero_grad`` / ``PreTrainedModel.num_parameters``."""
    calls = {"train": 0, "zero_grad": 0, "num_parameters": 0}
    for owner, name in ((nn.Module, "train"), (nn.Module, "zero_grad"), (transformers.PreTrainedModel, "num_parameters")):
        original = getattr(owner, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def test_train_in_the_current_mode_walks_nothing(class_calls):
    model = _tree().train()
    with FixedTree(model):
        before = class_calls["train"]
        assert model.train() is model
        assert class_calls["train"] == before


def test_a_submodule_in_another_mode_gets_the_whole_tree_set(class_calls):
    model = _tree().train()
    with FixedTree(model):
        model[1][0].eval()  # set directly, below the top
        model.train()
        assert all(m.training for m in model.modules())
        model.eval()  # nn.Module.eval calls self.train(False): the instance function
        assert not any(m.training for m in model.modules())


def test_zero_grad_and_parameters_cover_every_parameter():
    model = _tree()
    with FixedTree(model):
        assert [id(p) for p in model.parameters()] == [id(p) for p in nn.Module.parameters(model)]
        model(torch.ones(3, 4)).sum().backward()
        assert all(p.grad is not None for p in nn.Module.parameters(model))
        model.zero_grad()
        assert all(p.grad is None for p in nn.Module.parameters(model))


def test_leaving_restores_the_class_methods():
    model = _tree()
    with FixedTree(model):
        assert {"train", "zero_grad", "parameters"} <= set(model.__dict__)
    assert not {"train", "zero_grad", "parameters"} & set(model.__dict__)


def test_training_steps_walk_the_tree_once_per_run(tiny_cfg, monkeypatch, class_calls):
    """Through train_lora.py: after the first step, no step reaches nn.Module.train, and the FLOP count's
    parameter count is taken once (HF: a whole-tree walk each, every step)."""
    per_step: list[int] = []
    original = transformers.Trainer.training_step

    def step(self, *args, **kwargs):
        before = class_calls["train"]
        out = original(self, *args, **kwargs)
        per_step.append(class_calls["train"] - before)
        return out

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    steps = 6
    zero_grad_before, num_parameters_before = class_calls["zero_grad"], class_calls["num_parameters"]
    train_lora.main(tiny_cfg("deepseek_ocr_v1", "training.per_device_train_batch_size=2", "training.eval_strategy=no",
                             "training.save_strategy=no", "data.max_train_samples=16", f"training.max_steps={steps}"))
    assert len(per_step) == steps
    assert per_step[1:] == [0] * (steps - 1)
    # HF's loop calls model.zero_grad() once before the first step (before FixedTree), then after each step.
    assert class_calls["zero_grad"] - zero_grad_before == 1
    assert class_calls["num_parameters"] - num_parameters_before == 1
