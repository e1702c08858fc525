"""Grouped MoE experts (``moe_implementation="grouped"``) == the Python loop over expert modules.

fp32 on CPU, PEFT LoRA attached to every expert projection (the pipeline's regex), routing forced to be
unbalanced with one expert that receives no token. Compared: the layer output and the gradients of the input
and of every LoRA A/B. Also: the per-expert reference path (no grouped kernel), the PEFT fall-backs, and a
whole-model loss.
"""

from __future__ import annotations

import logging

import pytest
import torch

peft = pytest.importorskip("peft")

from dsocr.models.deepseek_ocr_v1 import grouped_experts  # noqa: E402
from dsocr.models.deepseek_ocr_v1.family import DeepseekOCRv1Family, tiny_config  # noqa: E402
from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM  # noqa: E402

FAMILY = DeepseekOCRv1Family()
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(n_experts: int = 6, top_k: int = 2, r: int = 4, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config()
    config.n_routed_experts, config.num_experts_per_tok = n_experts, top_k
    model = DeepseekOCRForCausalLM(config).float()
    targets = FAMILY.lora_targets(model, MODULES)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, **targets))
    with torch.no_grad():  # lora_B starts at zero: randomise so every A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model


def _moe(model):
    return model.base_model.model.model.layers[1].mlp


def _force_routing(moe, n_tokens: int):
    """Fixed, unbalanced routing: expert 0 takes most tokens, the last expert none."""
    n_exp, k = len(moe.experts), moe.top_k
    g = torch.Generator().manual_seed(1)
    idx = torch.zeros(n_tokens, k, dtype=torch.long)
    for t in range(n_tokens):
        first = 0 if t % 3 else int(torch.randint(1, n_exp - 1, (1,), generator=g))
        rest = torch.randperm(n_exp - 1, generator=g)
        rest = rest[rest != first][: k - 1]
        idx[t, 0], idx[t, 1:] = first, rest
    weight = torch.rand(n_tokens, k, generator=g)
    real_forward = moe.gate.forward

    def forward(x):
        _, _, scores = real_forward(x)
        return idx, weight, scores

    moe.gate.forward = forward
    return idx


def _run(moe, x, impl: str):
    moe.config.moe_implementation = impl
    for p in moe.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = moe(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad and p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def _compare(moe, x, atol=1e-5):
    y_loop, gx_loop, g_loop = _run(moe, x, "loop")
    ran = []
    real = moe._grouped.forward

    def spy(*a):
        out = real(*a)
        ran.append(out is not None)
        return out

    moe._grouped.forward = spy
    try:
        y_grp, gx_grp, g_grp = _run(moe, x, "grouped")
    finally:
        del moe._grouped.forward
    assert ran and all(ran), "the grouped path did not run"
    torch.testing.assert_close(y_grp, y_loop, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx_grp, gx_loop, atol=atol, rtol=1e-5)
    lora_names = [n for n in g_loop if "lora_" in n]
    assert len(lora_names) == 3 * 2 * (len(moe.experts) - 1) + 3 * 2  # empty expert: no grad in the loop
    for name in lora_names:
        torch.testing.assert_close(g_grp[name], g_loop[name], atol=atol, rtol=1e-5, msg=name)
    # The expert that received no token: zero gradient in the grouped path (none in the loop).
    empty = len(moe.experts) - 1
    for name, grad in g_grp.items():
        if f"experts.{empty}." in name:
            assert torch.count_nonzero(grad) == 0, name
    return y_grp


def test_grouped_equals_loop_with_lora_unbalanced_and_empty_expert():
    model = _lora_model()
    moe = _moe(model)
    x = torch.randn(3, 11, model.config.hidden_size)
    idx = _force_routing(moe, 33)
    counts = torch.bincount(idx.reshape(-1), minlength=len(moe.experts))
    assert counts[-1] == 0 and counts[0] > 2 * counts[1:-1].max()
    assert grouped_experts._grouped_kernel_fits(x, [64, 32, 4])  # the grouped GEMM kernel itself runs here
    _compare(moe, x)


def test_reference_path_without_grouped_kernel(monkeypatch):
    model = _lora_model(r=3)  # r*4 bytes not 16-byte aligned: the per-expert reference path runs
    moe = _moe(model)
    x = torch.randn(2, 9, model.config.hidden_size)
    _force_routing(moe, 18)
    calls = []
    real = grouped_experts._gmm
    monkeypatch.setattr(grouped_experts, "_gmm", lambda *a: calls.append(a[3] is not None) or real(*a))
    _compare(moe, x)
    assert calls and all(calls)


def test_plain_model_without_peft_and_frozen_base_cache():
    torch.manual_seed(0)
    model = DeepseekOCRForCausalLM(tiny_config()).float()
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        outs = {}
        for impl in ("loop", "grouped"):
            moe.config.moe_implementation = impl
            outs[impl] = moe(x)
        torch.testing.assert_close(outs["grouped"], outs["loop"], atol=1e-5, rtol=1e-5)
        # An in-place weight change (e.g. a LoRA merge) must invalidate the cached stacked weights.
        for p in moe.experts.parameters():
            p.requires_grad_(False)
        moe(x)
        moe.experts[0].down_proj.weight.mul_(2.0)
        moe.config.moe_implementation = "grouped"
        changed = moe(x)
        moe.config.moe_implementation = "loop"
        torch.testing.assert_close(changed, moe(x), atol=1e-5, rtol=1e-5)


def test_stacks_are_reused_under_no_grad_and_rebuilt_after_a_weight_change(monkeypatch):
    # Decoding calls each MoE layer once per new token: with grad off the stacked base and LoRA weights are
    # built once (weights that require grad included: a loaded model's do), and rebuilt when one changes.
    model = _lora_model()
    moe = _moe(model)
    x = torch.randn(2, 5, model.config.hidden_size)
    builds = {"lora": 0, "base": 0}
    real_lora = grouped_experts._stack_lora
    monkeypatch.setattr(grouped_experts, "_stack_lora", lambda *a: builds.__setitem__("lora", builds["lora"] + 1) or real_lora(*a))
    real_base = grouped_experts.GroupedExperts.base_stacks

    def base(self, *a):
        before = self._stack
        out = real_base(self, *a)
        builds["base"] += out is not before
        return out

    monkeypatch.setattr(grouped_experts.GroupedExperts, "base_stacks", base)
    with torch.no_grad():
        moe.config.moe_implementation = "grouped"
        first = moe(x)
        for _ in range(3):
            torch.testing.assert_close(moe(x), first, atol=0, rtol=0)
        assert builds == {"lora": 3, "base": 1}  # one stack per projection (gate, up, down), once
        moe.experts[2].up_proj.lora_B["default"].weight.mul_(3.0)
        changed = moe(x)
        moe.config.moe_implementation = "loop"
        torch.testing.assert_close(changed, moe(x), atol=1e-5, rtol=1e-5)
    assert builds["lora"] == 6 and not torch.equal(changed, first)


def test_base_stack_of_weights_that_require_grad_is_cached_under_no_grad(monkeypatch):
    # from_pretrained leaves requires_grad on: prediction with a merged export must not restack the experts
    # (hundreds of MB per layer on the full model) at every decoding step.
    torch.manual_seed(0)
    moe = DeepseekOCRForCausalLM(tiny_config()).float().model.layers[1].mlp
    assert all(p.requires_grad for p in moe.experts.parameters())
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(grouped_experts.torch, "stack", lambda *a, **k: stacks.append(1) or real_stack(*a, **k))
    x = torch.randn(1, 4, moe.config.hidden_size)
    with torch.no_grad():
        for _ in range(4):
            moe(x)
    assert len(stacks) == 3  # gate, up, down: once


def test_dropout_in_training_falls_back_to_loop(caplog):
    model = _lora_model(dropout=0.1)
    moe = _moe(model)
    moe.config.moe_implementation = "grouped"
    model.train()
    x = torch.randn(1, 5, model.config.hidden_size)
    with caplog.at_level(logging.WARNING):
        grouped_experts._LOGGED_FALLBACKS.clear()
        assert moe._grouped.forward(moe.experts, x.reshape(-1, x.shape[-1]), torch.zeros(5, dtype=torch.long)) is None
    assert "looping over experts" in caplog.text
    model.eval()  # dropout inactive in eval: the grouped path is exact again
    assert moe._grouped.forward(moe.experts, x.reshape(-1, x.shape[-1]), torch.zeros(5, dtype=torch.long)) is not None


def _whole_model_grads(model, impl: str, ids, labels):
    model.base_model.model.config.moe_implementation = impl
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _assert_same_grads(grouped: dict, loop: dict, **tol):
    """Every gradient of the loop path equals the grouped one; grads only the grouped path has are zero."""
    for name, g in loop.items():
        torch.testing.assert_close(grouped[name], g, msg=name, **tol)
    for name in grouped.keys() - loop.keys():  # an expert no token reached: no grad in the loop
        assert torch.count_nonzero(grouped[name]) == 0, name


def test_whole_model_loss_and_grads_equal():
    model = _lora_model(n_experts=4)
    ids = torch.randint(3, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    loss_loop, g_loop = _whole_model_grads(model, "loop", ids, labels)
    loss_grp, g_grp = _whole_model_grads(model, "grouped", ids, labels)
    torch.testing.assert_close(loss_grp, loss_loop, atol=1e-5, rtol=1e-5)
    # The routed experts' LoRA weights are part of the comparison (the grouped kernel computes them).
    expert_lora = [n for n in g_loop if ".mlp.experts." in n and "lora_" in n]
    assert len(expert_lora) >= 2 * 3 * 2, expert_lora  # at least two experts x gate/up/down x A/B
    assert any("self_attn" in n for n in g_loop) and any("shared_experts" in n for n in g_loop)
    _assert_same_grads(g_grp, g_loop, atol=1e-5, rtol=1e-5)


def _grouped_equals_loop_bf16(device: str):
    """Grouped vs loop experts with bf16 weights on ``device``, where the grouped GEMM kernel runs."""
    model = _lora_model(n_experts=8, r=16).to(device, torch.bfloat16)  # the recipe's rank: widths % 8 == 0
    moe = _moe(model)
    x = torch.randn(4, 64, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    assert grouped_experts._grouped_kernel_fits(x, [model.config.hidden_size, model.config.moe_intermediate_size, 16])
    # bf16 has an 8-bit mantissa and the two paths sum in different orders: compare at bf16 resolution,
    # relative to each tensor's scale.
    y_loop, gx_loop, g_loop = _run(moe, x, "loop")
    y_grp, gx_grp, g_grp = _run(moe, x, "grouped")
    scale = y_loop.float().abs().max()
    torch.testing.assert_close(y_grp.float() / scale, y_loop.float() / scale, atol=2e-2, rtol=0)
    for name, g in g_loop.items():
        s = g.float().abs().max().clamp_min(1e-12)
        torch.testing.assert_close(g_grp[name].float() / s, g.float() / s, atol=3e-2, rtol=0, msg=name)
    ids = torch.randint(3, 1000, (2, 48), device=device)
    labels = ids.clone()
    labels[:, :8] = -100
    loss_loop, _ = _whole_model_grads(model, "loop", ids, labels)
    loss_grp, _ = _whole_model_grads(model, "grouped", ids, labels)
    torch.testing.assert_close(loss_grp.float(), loss_loop.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_grouped_equals_loop_bf16_cpu():
    """The same comparison on the CPU kernel (bf16 on CPU is slow: minutes), so the GPU test's code runs here."""
    _grouped_equals_loop_bf16("cpu")


@pytest.mark.gpu
def test_grouped_equals_loop_bf16_cuda():
    """The GPU recipe's path: bf16 weights on CUDA, where the grouped GEMM kernel (not the CPU one) runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _grouped_equals_loop_bf16("cuda")


def test_config_rejects_unknown_moe_implementation():
    with pytest.raises(ValueError, match="moe_implementation"):
        type(tiny_config())(moe_implementation="fast")
