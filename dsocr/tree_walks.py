"""The module-tree walks of HF's training loop, done once per run instead of once per step.

Each optimizer step, ``Trainer`` walks the whole module tree several times on the host: ``model.train()``
at the start of ``training_step``, ``model.parameters()`` for gradient clipping, ``model.zero_grad()``
after the optimizer, and ``model.num_parameters(exclude_embeddings=True)`` (two walks) for the FLOP count
of every micro-batch. With LoRA on v1's routed experts the tree holds about 26,000 modules (PEFT wraps
each of the 2,112 expert projections in ~12), so each walk costs tens of milliseconds of host time while
the GPU waits (CPU, v1's module counts at tiny widths: ``train()`` 112 ms, ``zero_grad()`` 47 ms,
``parameters()`` 46 ms, ``num_parameters`` 88 ms).

Nothing adds, removes or re-registers modules or parameters while the Trainer trains, so ``FixedTree``
takes the lists once, when training starts, and for the duration of ``train()`` gives the stepped model
instance-level ``train``, ``zero_grad`` and ``parameters`` that use them:

* ``train(mode)`` checks every module's flag against the flat list (a few ms) and falls back to
  ``nn.Module.train`` whenever one differs, so evaluation's ``eval()`` and the next step's ``train()``
  still reach every module;
* ``zero_grad()`` sets the listed parameters' gradients to None (``set_to_none=False`` falls back);
* ``parameters()`` iterates the list (``recurse=False`` falls back).

On exit the instance attributes are removed and the class methods apply again. Not used under
DeepSpeed, whose engine has its own ``train`` and ``zero_grad``.
"""

from __future__ import annotations

import torch

__all__ = ["FixedTree"]

_NAMES = ("train", "zero_grad", "parameters")


class FixedTree:
    """Context manager: ``model``'s per-step tree walks over lists taken on entry (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._modules: list[torch.nn.Module] = []
        self._params: list[torch.nn.Parameter] = []

    def __enter__(self) -> FixedTree:
        model, cls = self.model, type(self.model)
        clashes = [n for n in _NAMES if n in model.__dict__]
        if clashes:
            raise RuntimeError(f"{cls.__name__} instance already has its own {clashes}: FixedTree would hide them")
        self._modules = list(model.modules())
        self._params = list(model.parameters())
        modules, params = self._modules, self._params

        def train(mode: bool = True):
            if not isinstance(mode, bool):
                raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
            if any(m.training is not mode for m in modules):
                cls.train(model, mode)
            return model

        def zero_grad(set_to_none: bool = True) -> None:
            if not set_to_none:
                return cls.zero_grad(model, set_to_none)
            for p in params:
                p.grad = None
            return None

        def parameters(recurse: bool = True):
            return iter(params) if recurse else cls.parameters(model, recurse)

        # A plain function in the instance __dict__ shadows the class method (nn.Module.__setattr__ stores
        # non-tensor, non-module values there).
        model.train, model.zero_grad, model.parameters = train, zero_grad, parameters
        return self

    def __exit__(self, *exc) -> None:
        for name in _NAMES:
            self.model.__dict__.pop(name, None)
        self._modules, self._params = [], []
