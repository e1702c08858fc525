"""LoRA under autocast without PEFT's float32 round trip of every input.

The trained LoRA A/B are float32 master weights (``dsocr.adapters.upcast_trainable``). Before each LoRA
term, PEFT casts the layer's input to the adapter's dtype (``BaseTunerLayer._cast_input_dtype``): a bf16
activation ``[batch, tokens, hidden]`` becomes a float32 copy, which autocast then casts straight back to
bf16 for the matmul, and autograd records both casts for the backward. Under autocast the values reaching
the matmul are the same either way (bf16 -> float32 is exact, and autocast rounds it back to the same bf16),
so the round trip changes no number and costs two activation-sized copies forward and two backward per LoRA
layer and step.

``LoraInputCasts`` switches PEFT's documented per-layer flag ``cast_input_dtype_enabled`` (what
``peft.helpers.disable_input_dtype_casting`` sets) off for the duration of a training step and back on
after it. The helper walks the module tree on every entry; this one takes the layer list once (v1 with LoRA
on the routed experts has ~2,200 LoRA layers among ~26,000 modules) and writes the flag into each layer's
``__dict__``, which is where ``nn.Module.__setattr__`` keeps a plain attribute. Outside the training step
(evaluation and generation run without autocast) PEFT casts as usual, which a bf16 model with float32
adapters needs.
"""

from __future__ import annotations

import torch

__all__ = ["LoraInputCasts"]

_FLAG = "cast_input_dtype_enabled"


class LoraInputCasts:
    """Context manager (re-enterable): PEFT's LoRA input casts off inside, restored on exit."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._saved: list[object] = []

    def __enter__(self) -> LoraInputCasts:
        missing = object()
        self._saved = [layer.__dict__.get(_FLAG, missing) for layer in self.layers]
        self._missing = missing
        for layer in self.layers:
            layer.__dict__[_FLAG] = False
        return self

    def __exit__(self, *exc) -> None:
        for layer, value in zip(self.layers, self._saved, strict=True):
            if value is self._missing:
                layer.__dict__.pop(_FLAG, None)
            else:
                layer.__dict__[_FLAG] = value
        self._saved = []
