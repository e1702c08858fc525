"""Grouped experts: each projection of all routed experts of a MoE layer as one grouped GEMM, LoRA included.

The model keeps one ``nn.Linear`` per expert projection (the official checkpoint layout, and what PEFT wraps
one by one); this module stacks their weights ``[E, out, in]`` and runs them with
``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch) over the tokens sorted by expert.
To add each expert's own LoRA term it reads PEFT's LoRA layer attributes (``base_layer``, ``lora_A``,
``lora_B``, ``lora_dropout``, ``scaling``, ``active_adapters``, ``merged``, ``use_dora``): the part of the
model a PEFT upgrade can break, kept here in one place (``dsocr/versions.py`` pins PEFT). Anything it
cannot express returns ``None`` and the caller loops over the expert modules instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextMLP

# ------------------------------------------------------------------------------------------------------------
# Grouped experts: one grouped GEMM per projection for all experts of a layer, LoRA included
# ------------------------------------------------------------------------------------------------------------

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_LOGGED_FALLBACKS: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(reason)
        logging.getLogger(__name__).warning("MoE: grouped experts unavailable (%s); looping over experts", reason)


def _lora_pieces(proj: nn.Module):
    """Split an expert projection into ``(base nn.Linear, [(lora_A weight, lora_B weight, scaling), ...])``.

    Plain ``nn.Linear`` → no LoRA term. A PEFT LoRA ``Linear`` is accepted when every active adapter is vanilla
    LoRA (no DoRA or other variant, no LoRA bias, dropout off: ``p == 0`` or eval mode) and it is not merged
    or disabled in a way that makes PEFT rewrite weights. Anything else → ``None`` (the caller loops instead).
    """
    if type(proj) is nn.Linear:
        return proj, []
    base = getattr(proj, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(proj, "lora_A"):
        return None
    if getattr(proj, "disable_adapters", False):
        return None if getattr(proj, "merged", False) else (base, [])
    if getattr(proj, "merged", False):
        return base, []  # PEFT then runs the (merged) base layer alone
    pieces = []
    for name in proj.active_adapters:
        if name not in proj.lora_A:
            continue
        if name in getattr(proj, "lora_variant", {}) or getattr(proj, "use_dora", {}).get(name, False):
            return None
        lora_a, lora_b, drop = proj.lora_A[name], proj.lora_B[name], proj.lora_dropout[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
            return None
        if not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training)):
            return None
        pieces.append((lora_a.weight, lora_b.weight, float(proj.scaling[name])))
    return base, pieces


def _gmm(x: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor, counts_host) -> torch.Tensor:
    """Rows of ``x`` (sorted by expert, ``offs`` = int32 cumulative ends) times ``weight_t[e]`` ([E, in, out])."""
    if counts_host is None:
        return _GROUPED_MM(x, weight_t, offs=offs)
    # Reference path (no grouped GEMM kernel for these shapes/dtypes): one matmul per non-empty expert.
    outs, start = [], 0
    for e, n in enumerate(counts_host):
        if n:
            outs.append(x[start : start + n] @ weight_t[e])
            start += n
    if not outs:
        return x.new_zeros(0, weight_t.shape[-1])
    return torch.cat(outs, dim=0)


def _grouped_kernel_fits(x: torch.Tensor, widths: list[int]) -> bool:
    """Whether the grouped GEMM kernel takes these operands (else the per-expert reference path runs)."""
    if _GROUPED_MM is None:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and all(w % 8 == 0 for w in widths)
    # The CPU kernel wants 16-byte aligned rows.
    return x.device.type == "cpu" and all((w * x.element_size()) % 16 == 0 for w in widths)


class GroupedExperts:
    """Stacks the experts' weights of one MoE layer ([E, out, in] per projection) and runs them grouped.

    The frozen base weights are stacked once and cached, keyed by each weight's storage pointer and version
    counter (so ``.to()``, loading or in-place merges rebuild it); weights that require grad are stacked
    under autograd every call instead. LoRA A/B of each expert are stacked per call (tiny), so every expert
    keeps its own ``lora_A``/``lora_B`` Parameters and gets its own gradient; in training they are pooled
    instead (``pool_expert_lora``: one Parameter per projection, used as it is).
    """

    def __init__(self):
        self._key = None
        self._stack = None
        self._lora_key = None
        self._lora_stack = None
        self._pooled_cache: dict = {}

    def base_stacks(self, gates, ups, downs, dtype):
        """The stacked base weights ``([E, 2I, H] gate+up, [E, H, I] down)`` in ``dtype``, cached while frozen."""
        weights = [m.weight for m in (*gates, *ups, *downs)]
        # Weights that get a gradient are stacked under autograd every call; with grad off (evaluation,
        # prediction: a loaded model's weights require grad by default) the stack is cached like frozen ones.
        trainable = any(w.requires_grad for w in weights) and torch.is_grad_enabled()
        key = (dtype, tuple((w.data_ptr(), w._version) for w in weights))
        if not trainable and key == self._key:
            return self._stack
        with torch.set_grad_enabled(trainable):
            gate_up = torch.cat([torch.stack([m.weight for m in gates]), torch.stack([m.weight for m in ups])], dim=1)
            down = torch.stack([m.weight for m in downs])
            stack = (gate_up.to(dtype), down.to(dtype))
        if trainable:
            self._key, self._stack = None, None
        else:
            self._key, self._stack = key, stack
        return stack

    def lora_stacks(self, lora: dict, dtype: torch.dtype) -> dict:
        """Per projection, ``_stack_lora`` of its experts' adapters; cached while no adapter weight needs a gradient.

        In evaluation and prediction (adapters frozen or grad off) the stacks are the same at every decoding
        step: building them anew (six stacks of 64 tensors per layer) would cost more than the step's GEMMs.
        """
        weights = [t for pieces in lora.values() for per_expert in pieces for a, b, _ in per_expert for t in (a, b)]
        if any(w.requires_grad for w in weights) and torch.is_grad_enabled():
            self._lora_key, self._lora_stack = None, None
            return {name: _stack_lora(pieces, dtype) for name, pieces in lora.items()}
        key = (dtype, tuple((w.data_ptr(), w._version) for w in weights),
               tuple(s for pieces in lora.values() for per_expert in pieces for _, _, s in per_expert))
        if key != self._lora_key:
            with torch.no_grad():
                self._lora_stack = {name: _stack_lora(pieces, dtype) for name, pieces in lora.items()}
            self._lora_key = key
        return self._lora_stack

    def forward(self, experts, routed_in: torch.Tensor, sorted_experts: torch.Tensor,
                pool: nn.ParameterDict | None = None) -> torch.Tensor | None:
        """All ``experts`` on the expert-sorted rows ``routed_in`` ``[N, H]``; ``None`` = use the loop instead.

        Args:
            experts: The layer's ``nn.ModuleList`` of gated MLPs (possibly PEFT-wrapped projections).
            routed_in: The routed token copies, sorted by expert.
            sorted_experts: The expert index of each row of ``routed_in`` (non-decreasing).
            pool: The layer's pooled expert adapters (``pool_expert_lora``), if pooled.
        """
        if pool is not None and len(pool):
            return self._forward_pooled(experts, routed_in, sorted_experts, pool)
        gates, ups, downs, lora = [], [], [], {"gate": [], "up": [], "down": []}
        for expert in experts:
            if type(expert) is not DeepseekOcr2TextMLP:
                _log_fallback_once(f"expert module {type(expert).__name__} is not the plain gated MLP")
                return None
            for name, bases in (("gate", gates), ("up", ups), ("down", downs)):
                pieces = _lora_pieces(getattr(expert, f"{name}_proj"))
                if pieces is None:
                    _log_fallback_once(
                        "an expert projection is not an nn.Linear or a vanilla PEFT LoRA Linear without dropout "
                        "(DoRA, LoRA variants, lora_dropout > 0 in training, LoRA bias or merged+disabled adapters)"
                    )
                    return None
                if pieces[0].bias is not None:
                    _log_fallback_once("expert projections with bias")
                    return None
                bases.append(pieces[0])
                lora[name].append(pieces[1])
        dtype = routed_in.dtype
        stacked = self.lora_stacks(lora, dtype)
        if any(v is None for v in stacked.values()):
            _log_fallback_once("experts carry different LoRA adapters or ranks")
            return None
        return self._run(experts, gates, ups, downs, stacked, routed_in, sorted_experts)

    def _forward_pooled(self, experts, routed_in, sorted_experts, pool: nn.ParameterDict) -> torch.Tensor:
        """``forward`` with the experts' LoRA A/B read from the layer's pooled Parameters."""
        gates, ups, downs = [], [], []
        stacked = {}
        for proj, bases in (("gate", gates), ("up", ups), ("down", downs)):
            mods = [getattr(expert, f"{proj}_proj") for expert in experts]
            if type(mods[0]) is nn.Linear:  # a projection LoRA does not target
                bases.extend(mods)
                stacked[proj] = []
            else:
                bases.extend(m.base_layer for m in mods)
                stacked[proj] = self.pooled_stacks(proj, mods[0], pool, routed_in.dtype)
        return self._run(experts, gates, ups, downs, stacked, routed_in, sorted_experts)

    def pooled_stacks(self, proj: str, first: nn.Module, pool: nn.ParameterDict, dtype: torch.dtype) -> list:
        """``[(A [E, r, in], B*scaling [E, out, r])]`` of the active adapters of projection ``proj``.

        PEFT's switches are read from the first expert's wrapper (``pool_expert_lora`` pooled only experts
        whose adapters agree): merged or disabled adapters add no term. Under no_grad the cast stacks are
        cached (decoding reuses them at every step) until a pooled weight changes.
        """
        if getattr(first, "merged", False) or getattr(first, "disable_adapters", False):
            return []
        names = [n for n in first.active_adapters if _pool_key(proj, "A", n) in pool]
        tensors = [pool[_pool_key(proj, part, n)] for n in names for part in ("A", "B")]
        scalings = [float(first.scaling[n]) for n in names]
        def build():
            return [(tensors[2 * j].to(dtype), tensors[2 * j + 1].to(dtype) * s) for j, s in enumerate(scalings)]

        if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
            # A training forward drops the cache: fused optimizers update in place without bumping the
            # version counter, so the key below cannot see an optimizer step (every step has a forward first).
            self._pooled_cache.pop(proj, None)
            return build()
        key = (proj, dtype, tuple((t.data_ptr(), t._version) for t in tensors), tuple(scalings))
        cache = self._pooled_cache.get(proj)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._pooled_cache[proj] = (key, build())
        return cache[1]

    def _run(self, experts, gates, ups, downs, stacked: dict, routed_in: torch.Tensor,
             sorted_experts: torch.Tensor) -> torch.Tensor:
        """The grouped GEMMs: stacked base weights plus the stacked LoRA terms ``stacked[proj]``."""
        dtype = routed_in.dtype
        n_exp = len(experts)
        inter = gates[0].weight.shape[0]
        w_gate_up, w_down = self.base_stacks(gates, ups, downs, dtype)  # [E, 2I, H], [E, H, I]
        # Cumulative end offset of each expert's rows: computed on the device (no host sync).
        offs = torch.searchsorted(
            sorted_experts, torch.arange(n_exp, device=sorted_experts.device, dtype=sorted_experts.dtype), right=True
        ).to(torch.int32)
        widths = [routed_in.shape[-1], inter] + [a.shape[1] for pieces in stacked.values() for a, _ in pieces]
        counts_host = None
        if not _grouped_kernel_fits(routed_in, widths):
            counts_host = torch.bincount(sorted_experts, minlength=n_exp).tolist()

        def lora_terms(x: torch.Tensor, pieces) -> torch.Tensor | None:
            total = None
            for a, b in pieces:
                term = _gmm(_gmm(x, a.transpose(1, 2), offs, counts_host), b.transpose(1, 2), offs, counts_host)
                total = term if total is None else total + term
            return total

        gate_up = _gmm(routed_in, w_gate_up.transpose(1, 2), offs, counts_host)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        extra = lora_terms(routed_in, stacked["gate"])
        if extra is not None:
            gate = gate + extra
        extra = lora_terms(routed_in, stacked["up"])
        if extra is not None:
            up = up + extra
        hidden = experts[0].act_fn(gate) * up
        out = _gmm(hidden, w_down.transpose(1, 2), offs, counts_host)
        extra = lora_terms(hidden, stacked["down"])
        return out if extra is None else out + extra


def _stack_lora(pieces_per_expert, dtype):
    """Per adapter index: (A [E, r, in], B*scaling [E, out, r]) in ``dtype``; ``None`` if ranks differ."""
    n_adapters = {len(p) for p in pieces_per_expert}
    if len(n_adapters) != 1:
        return None
    out = []
    for j in range(n_adapters.pop()):
        a_list = [p[j][0] for p in pieces_per_expert]
        b_list = [p[j][1] for p in pieces_per_expert]
        scal = [p[j][2] for p in pieces_per_expert]
        if len({a.shape for a in a_list}) != 1 or len({b.shape for b in b_list}) != 1:
            return None
        a = torch.stack(a_list).to(dtype)
        b = torch.stack(b_list).to(dtype)
        if len(set(scal)) == 1:
            b = b * scal[0]
        else:
            b = b * torch.tensor(scal, dtype=b.dtype, device=b.device)[:, None, None]
        out.append((a, b))
    return out




# ------------------------------------------------------------------------------------------------------------
# Pooled expert adapters: one trainable Parameter per projection, not one per expert
# ------------------------------------------------------------------------------------------------------------

#: Attribute of a pooled MoE block holding its ``nn.ParameterDict`` of pooled adapters. The name has no
#: ``lora_`` in it: PEFT's adapter state dict (keys with ``lora_``) keeps the per-expert names only.
POOL_ATTR = "expert_adapter_pool"
_PARTS = {"A": "lora_A", "B": "lora_B"}


def _pool_key(proj: str, part: str, adapter: str) -> str:
    return f"{proj}_{part}_{adapter}"


def _poolable(mods: list[nn.Module]) -> tuple[list[str], str] | tuple[None, str]:
    """The adapter names of the expert projections ``mods`` if their LoRA can be pooled, else ``(None, why)``."""
    first = mods[0]
    names = list(getattr(first, "lora_A", {}) or {})
    if not names:
        return None, "some expert projections carry no LoRA"
    for m in mods:
        if type(getattr(m, "base_layer", None)) is not nn.Linear or list(m.lora_A) != names:
            return None, "the experts' projections differ (not all vanilla PEFT LoRA Linear with the same adapters)"
        if getattr(m, "merged", False) or getattr(m, "disable_adapters", False) or m.base_layer.bias is not None:
            return None, "merged or disabled adapters, or a bias on the experts"
        for name in names:
            if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
                return None, "DoRA or another LoRA variant"
            drop = m.lora_dropout[name]
            if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
                return None, "lora_dropout > 0 (the grouped path cannot apply a per-expert dropout)"
            if float(m.scaling[name]) != float(first.scaling[name]):
                return None, "experts with different LoRA scalings"
            for attr in _PARTS.values():
                lin, ref = getattr(m, attr)[name], getattr(first, attr)[name]
                w = lin.weight
                if (type(lin) is not nn.Linear or lin.bias is not None or not isinstance(w, nn.Parameter)
                        or not w.requires_grad or w.shape != ref.weight.shape or w.dtype != ref.weight.dtype
                        or w.device != ref.weight.device):
                    return None, "expert adapters that are frozen, already pooled, or of different shapes"
    dotted = [name for name in names if "." in name]
    if dotted:
        return None, f"adapter name {dotted[0]!r} contains a dot"
    return names, ""


def pool_expert_lora(moe: nn.Module) -> int:
    """Make the experts' LoRA A/B of the MoE block ``moe`` one trainable Parameter per projection and adapter.

    PEFT gives each routed expert its own A and B per projection: 64 experts x 3 projections x 2 = 384
    Parameters per layer, ~4,200 in v1. Each costs host time every optimizer step (its own gradient
    accumulation and unbind in the stack's backward, an entry in the gradient-norm and fused AdamW lists):
    a fixed cost that dominates a step at the small batches a user's card allows. Pooled, the leaves are
    ``A [E, r, in]`` and ``B [E, out, r]`` per projection (6 per layer), and the grouped GEMMs use them as
    they are (no per-call stacking).

    Nothing else changes: each expert's ``lora_A/lora_B[adapter].weight`` stays in place, as a buffer that
    is a view of its slice of the pool, so the state dict (PEFT's adapter file, checkpoints), loading (a copy
    into the views is a copy into the pool) and PEFT's merge see the same names and values as before; only
    the gradients live on the pool. The views are re-pointed before every state-dict read or load, in case
    the pool got new storage (a device or dtype move). Training only: loading an adapter for evaluation or
    export keeps PEFT's own layout.

    Returns:
        The number of pooled tensors (0 = left as it is: the block has no poolable LoRA; the reason is logged).
    """
    if getattr(moe, POOL_ATTR, None) is not None:
        return 0
    pool = nn.ParameterDict()
    plan = []
    for proj in ("gate", "up", "down"):
        mods = [getattr(expert, f"{proj}_proj") for expert in moe.experts]
        if all(type(m) is nn.Linear for m in mods):
            continue  # LoRA does not target this projection
        names, why = _poolable(mods)
        if names is None:
            _log_fallback_once(f"expert adapters not pooled: {why}")
            return 0
        plan.append((proj, mods, names))
    if not plan or any(type(expert) is not DeepseekOcr2TextMLP for expert in moe.experts):
        return 0
    for proj, mods, names in plan:
        for name in names:
            for part, attr in _PARTS.items():
                lins = [getattr(m, attr)[name] for m in mods]
                pool[_pool_key(proj, part, name)] = nn.Parameter(torch.stack([lin.weight.detach() for lin in lins]))
                for lin in lins:
                    del lin._parameters["weight"]
                    lin.register_buffer("weight", None)
    setattr(moe, POOL_ATTR, pool)
    _repoint_views(moe)
    moe.register_state_dict_pre_hook(lambda module, prefix, keep_vars: _repoint_views(module))
    moe.register_load_state_dict_pre_hook(lambda module, *args: _repoint_views(module))
    return len(pool)


def _view_holder(moe: nn.Module, key: str, expert: int) -> nn.Module:
    """The ``lora_A/B[adapter]`` Linear of ``expert`` whose weight is a view of pool entry ``key``."""
    proj, part, name = key.split("_", 2)
    return getattr(getattr(moe.experts[expert], f"{proj}_proj"), _PARTS[part])[name]


def _is_view_of(view: torch.Tensor | None, stacked: torch.Tensor, expert: int) -> bool:
    return view is not None and view.data_ptr() == stacked[expert].data_ptr() and view.dtype == stacked.dtype


def _repoint_views(moe: nn.Module) -> None:
    """Each expert's ``lora_A/B[adapter].weight`` buffer := the view of its slice of the pooled Parameter."""
    for key, stacked in getattr(moe, POOL_ATTR).items():
        flat = stacked.detach()
        for e in range(len(moe.experts)):
            lin = _view_holder(moe, key, e)
            if not _is_view_of(lin._buffers.get("weight"), flat, e):
                lin._buffers["weight"] = flat[e]


def repoint_if_moved(moe: nn.Module) -> None:
    """``_repoint_views`` when the pool has new storage (checked on one view: all move together)."""
    key, stacked = next(iter(getattr(moe, POOL_ATTR).items()))
    if not _is_view_of(_view_holder(moe, key, 0)._buffers.get("weight"), stacked.detach(), 0):
        _repoint_views(moe)
