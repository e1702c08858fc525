"""LoRA adapters through PEFT: adding one for training, loading a saved one completely.

This is the part a PEFT upgrade can break: ``load_adapter`` calls ``set_peft_model_state_dict`` and
switches off one PEFT module flag (``peft_v5_renaming_off``). ``dsocr/versions.py`` pins PEFT to the
tested version for that reason.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def add_lora(loaded) -> int:
    """Wrap ``loaded.model`` (a ``dsocr.loading.Loaded``) in a LoRA adapter on the language model.

    Returns:
        The number of trainable parameters.
    """
    from peft import LoraConfig, get_peft_model

    lora = loaded.cfg.lora
    targets = loaded.family.lora_targets(loaded.model, list(lora.target_modules))
    # Vision unfrozen on request: trained in full and saved inside the adapter folder (modules_to_save),
    # so a checkpoint stays self-contained; frozen (the seed's recipe) by default.
    extra = {"modules_to_save": list(loaded.family.vision_module_names)} if loaded.cfg.model.train_vision else {}
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", **targets, **extra)
    loaded.model = get_peft_model(loaded.model, peft_config)
    trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in loaded.model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.2f%%)", lora.r, lora.alpha,
             ",".join(lora.target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if trainable == 0:
        raise ValueError(f"LoRA targets {list(lora.target_modules)} matched no module of the language model")
    return trainable


@contextmanager
def peft_v5_renaming_off():
    """Switch off peft's transformers-v5 key conversion while loading adapters of this pipeline.

    With peft 0.21.2 + transformers 5.17 that conversion applies DeepSeek-OCR-2's v4->v5 checkpoint
    renaming to adapters that already carry v5 names (``model.language_model`` becomes
    ``model.language_model.language_model``): every LoRA weight is reported missing and stays at its
    init, so an evaluated "fine-tune" is silently the base model and a resumed run restarts its adapter.
    Our adapters are always saved by this pipeline in the current names, so no conversion is needed.
    """
    import peft.utils.save_and_load as peft_io

    saved = peft_io.is_transformers_ge_v5
    peft_io.is_transformers_ge_v5 = False
    try:
        yield
    finally:
        peft_io.is_transformers_ge_v5 = saved


def load_adapter(model, path: str | Path):
    """Wrap ``model`` with the LoRA adapter saved in ``path`` (inference mode) and check every tensor loaded.

    Not ``PeftModel.from_pretrained``, which loses OCR-2 adapters (see ``peft_v5_renaming_off``) and
    only warns about missing keys; here a missing or unexpected adapter weight is an error.
    """
    import peft.utils.save_and_load as peft_io
    from peft import PeftConfig, get_peft_model
    from safetensors.torch import load_file

    path = Path(path)
    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = True
    peft_model = get_peft_model(model, config)
    state = load_file(str(path / "adapter_model.safetensors"))
    with peft_v5_renaming_off():
        result = peft_io.set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if ".lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter {str(path)!r} does not fit the base model: {len(missing)} adapter weights missing "
            f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}). "
            "To fix: evaluate it with the base model it was trained on (model.name_or_path in its run_config.yaml)."
        )
    peft_model.eval()
    return peft_model
