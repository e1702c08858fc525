"""Pooled expert adapters (``grouped_experts.pool_expert_lora``): fewer trainable tensors, nothing else changes.

In training the routed experts' LoRA A/B of a v1 MoE layer become one Parameter per projection; each
expert's ``lora_A/B`` weight stays as a view of its slice. These tests hold the promise that this is a
layout change only: the same adapter file keys and values, the same loss and gradients, the same update,
loading into the pool, and views that follow the pool when it moves.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from dsocr.models.deepseek_ocr_v1 import grouped_experts
from dsocr.models.deepseek_ocr_v1.family import DeepseekOCRv1Family, tiny_config
from dsocr.models.deepseek_ocr_v1.modeling import DeepseekOCRForCausalLM

FAMILY = DeepseekOCRv1Family()
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EXPERTS = 4


def _lora_model(seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config()
    config.n_routed_experts, config.num_experts_per_tok = N_EXPERTS, 2
    model = DeepseekOCRForCausalLM(config).float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       **FAMILY.lora_targets(model, MODULES)))
    with torch.no_grad():  # lora_B starts at zero: randomise so every A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model


def _pair():
    """(PEFT's own layout, the same model pooled)."""
    plain = _lora_model()
    pooled = copy.deepcopy(plain)
    assert FAMILY.pool_adapters(pooled) == 6  # one MoE layer x gate/up/down x A/B
    return plain, pooled


def _pool_slice(pooled, name: str) -> torch.Tensor:
    """The pooled Parameter's slice that holds the per-expert LoRA weight ``name``."""
    head, tail = name.split(".experts.")
    expert, proj, part, adapter = tail.split(".")[:4]
    moe = pooled.get_submodule(head)
    key = f"{proj.removesuffix('_proj')}_{part.removeprefix('lora_')}_{adapter}"
    return getattr(moe, grouped_experts.POOL_ATTR)[key], int(expert)


def _loss(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 16), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach()


def test_pooling_replaces_per_expert_parameters_by_one_per_projection():
    plain, pooled = _pair()
    n_plain = sum(p.requires_grad for p in plain.parameters())
    n_pooled = sum(p.requires_grad for p in pooled.parameters())
    # 3 projections x A/B x E experts become 3 x 2 pooled tensors.
    assert n_plain - n_pooled == 3 * 2 * (N_EXPERTS - 1)
    assert sum(p.numel() for p in plain.parameters() if p.requires_grad) == \
        sum(p.numel() for p in pooled.parameters() if p.requires_grad)
    assert not any(".experts." in n and "lora_" in n for n, _ in pooled.named_parameters())


def test_pooled_adapter_file_has_the_same_keys_and_values():
    plain, pooled = _pair()
    a, b = get_peft_model_state_dict(plain), get_peft_model_state_dict(pooled)
    assert a.keys() == b.keys()
    assert sum(".experts." in k for k in a) == 3 * 2 * N_EXPERTS
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_pooled_loss_gradients_and_adamw_step_equal_the_per_expert_layout():
    plain, pooled = _pair()
    loss_a, loss_b = _loss(plain), _loss(pooled)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    expert_lora = [n for n, p in plain.named_parameters() if ".experts." in n and "lora_" in n]
    assert len(expert_lora) == 3 * 2 * N_EXPERTS
    for name in expert_lora:
        grad_a = plain.get_parameter(name).grad
        stacked, e = _pool_slice(pooled, name)
        grad_b = stacked.grad[e] if stacked.grad is not None else torch.zeros_like(grad_a)
        torch.testing.assert_close(grad_b, grad_a if grad_a is not None else torch.zeros_like(grad_b),
                                   rtol=1e-5, atol=1e-6, msg=name)
    for model in (plain, pooled):
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    a, b = get_peft_model_state_dict(plain), get_peft_model_state_dict(pooled)
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += ".experts." in k
    assert moved == 3 * 2 * N_EXPERTS
    # The step really changed the pooled weights that the file shows.
    assert not torch.equal(b[expert_lora[0].replace(".default", "")], get_peft_model_state_dict(_lora_model())[
        expert_lora[0].replace(".default", "")])


def test_loading_an_adapter_writes_into_the_pool(tmp_path):
    plain, pooled = _pair()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_" in name:
                p.add_(1.0)  # other values than the pooled copy holds
    state = get_peft_model_state_dict(plain)
    result = set_peft_model_state_dict(pooled, state)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    for name, p in plain.named_parameters():
        if ".experts." in name and "lora_" in name:
            stacked, e = _pool_slice(pooled, name)
            torch.testing.assert_close(stacked[e], p, rtol=0, atol=0, msg=name)
    # And the forward uses what was loaded.
    torch.testing.assert_close(_loss(pooled), _loss(plain), rtol=1e-6, atol=1e-6)


def test_views_follow_the_pool_after_it_gets_new_storage():
    _, pooled = _pair()
    pooled.double()  # every Parameter and buffer gets new storage: the views would go stale
    name = next(n for n in get_peft_model_state_dict(pooled) if ".experts." in n)
    module_name = name.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight")
    stacked, e = _pool_slice(pooled, module_name)
    with torch.no_grad():
        stacked[e].fill_(3.0)
    assert torch.all(get_peft_model_state_dict(pooled)[name] == 3.0)


def test_loop_implementation_refuses_pooled_experts():
    _, pooled = _pair()
    pooled.base_model.model.config.moe_implementation = "loop"
    with pytest.raises(RuntimeError, match="pooled"):
        _loss(pooled)


def test_dropout_keeps_peft_layout():
    torch.manual_seed(0)
    config = tiny_config()
    model = DeepseekOCRForCausalLM(config).float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                       **FAMILY.lora_targets(model, MODULES)))
    assert FAMILY.pool_adapters(model) == 0
    assert any(".experts." in n and "lora_" in n for n, _ in model.named_parameters())


def test_evaluation_after_a_fused_adamw_step_sees_the_new_weights():
    """Fused AdamW updates in place without bumping version counters: the no-grad stacks must not go stale."""
    plain, pooled = _pair()
    for model in (plain, pooled):
        model.eval()
        with torch.no_grad():
            _ = model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)  # fills the no-grad caches
        model.train()
        _loss(model)
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1, fused=True).step()
        model.eval()
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        torch.testing.assert_close(pooled(input_ids=ids, use_cache=False).logits,
                                   plain(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_the_forward_after_a_move_re_points_the_views():
    """A move gives the pool new storage and the views private copies (memory and staleness): fixed at once."""
    _, pooled = _pair()
    pooled.to(torch.bfloat16)
    moe = pooled.base_model.model.model.layers[1].mlp
    view = lambda: moe.experts[1].up_proj.lora_B["default"]._buffers["weight"]  # noqa: E731
    stacked = getattr(moe, grouped_experts.POOL_ATTR)["up_B_default"]
    assert view().data_ptr() != stacked[1].data_ptr()
    with torch.no_grad():
        pooled(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
    assert view().data_ptr() == stacked[1].data_ptr() and view().dtype == torch.bfloat16
