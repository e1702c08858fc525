"""LoRA wiring through the shared loading path: language-model-only targets, optional vision training."""

import pytest
import torch
from conftest import FAMILIES

from dsocr.adapters import add_lora, load_adapter
from dsocr.loading import load_base


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_only_touches_the_language_model(family, tiny_cfg):
    loaded = load_base(tiny_cfg(family))
    add_lora(loaded)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    vision = loaded.family.vision_module_names
    assert not any(v in n for n in trainable for v in vision), "a vision module got an adapter"


@pytest.mark.parametrize("family", FAMILIES)
def test_train_vision_saves_and_reloads_vision_weights(family, tiny_cfg, tmp_path):
    base_only = load_base(tiny_cfg(family))
    lora_only = add_lora(base_only)
    loaded = load_base(tiny_cfg(family, "model.train_vision=true"))
    with_vision = add_lora(loaded)
    assert with_vision > lora_only  # the towers and projector train in full
    vision_params = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert vision_params
    name, param = vision_params[0]
    with torch.no_grad():
        param.add_(0.5)  # pretend training moved it
    loaded.model.save_pretrained(tmp_path / "adapter")
    fresh = load_base(tiny_cfg(family)).model
    reloaded = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(dict(reloaded.named_parameters())[name], param)
