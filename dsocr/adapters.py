"""What trains: a LoRA adapter through PEFT or parts of the model in full; loading a saved adapter completely.

``prepare_training`` is the one entry for ``train_lora.py``: ``finetune.method: lora`` wraps the model in a
PEFT adapter (``add_lora``; parts listed in ``finetune.train`` are trained in full beside it, as PEFT
``modules_to_save``), ``full`` unfreezes the listed parts (``language_model``, ``projector``, ``vision``) of
the model itself. Either way every trainable parameter is then kept in float32 (``upcast_trainable``):
the master weights and AdamW's moments of a bf16/fp16 model must not be half precision (bf16 has 8 bits
of mantissa: updates below 1/256 of a weight vanish), and autocast (``training.bf16``/``fp16``) runs the
matmuls in half precision around them.

This is the part a PEFT upgrade can break: ``load_adapter`` calls ``set_peft_model_state_dict`` and
switches off one PEFT module flag (``peft_v5_renaming_off``). ``dsocr/versions.py`` pins PEFT to the
tested version for that reason.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


# Projector-side names of both families (the glue vectors included); the rest of a family's
# ``vision_module_names`` are its vision towers; everything else is the language model.
PROJECTOR_NAMES = frozenset({"projector", "multi_modal_projector", "image_newline", "view_seperator", "view_separator"})


def part_of(param_name: str, family) -> str:
    """``language_model``, ``projector`` or ``vision`` for a parameter name of ``family``'s model."""
    names = set(param_name.split("."))
    if names & PROJECTOR_NAMES:
        return "projector"
    if names & (set(family.vision_module_names) - PROJECTOR_NAMES):
        return "vision"
    return "language_model"


def _numel(p) -> int:
    """Elements of a parameter; under ZeRO-3 its full size (the local tensor is an empty placeholder)."""
    return int(getattr(p, "ds_numel", p.numel()))


def part_modules(family, parts: list[str]) -> list[str]:
    """PEFT ``modules_to_save`` names of ``parts`` (projector / vision) of ``family``."""
    out = []
    for name in family.vision_module_names:
        part = "projector" if name in PROJECTOR_NAMES else "vision"
        if part in parts:
            out.append(name)
    return out


def prepare_training(loaded) -> int:
    """Make ``loaded.model`` trainable as ``cfg.finetune`` says; returns the number of trainable parameters."""
    from dsocr.config import trained_parts

    cfg = loaded.cfg
    parts = trained_parts(cfg)
    if cfg.finetune.method == "lora":
        trainable = add_lora(loaded, parts)
    else:
        trainable = unfreeze_parts(loaded, parts)
    upcast_trainable(loaded.model)
    if cfg.finetune.method == "lora" and not dict(cfg.training).get("deepspeed"):
        # DeepSpeed re-lays Parameters into its own flat buffers: the family's layout stays PEFT's there.
        pooled = loaded.family.pool_adapters(loaded.model)
        if pooled:
            log.info("%d pooled adapter tensors replace the per-expert LoRA Parameters in training "
                     "(same adapter file; fewer tensors per optimizer step)", pooled)
    return trainable


def unfreeze_parts(loaded, parts: list[str]) -> int:
    """Full fine-tuning: ``requires_grad`` on the parameters of ``parts`` only, off on the rest."""
    model, family = loaded.model, loaded.family
    if hasattr(model, "set_vision_trainable"):
        model.set_vision_trainable("vision" in parts)  # v1 records the switch in its config.json
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = part_of(name, family)
        p.requires_grad_(part in parts)
        counts[part] = counts.get(part, 0) + _numel(p)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(counts.values())
    log.info("full fine-tuning of %s: %s trainable of %s parameters (%.1f%%); parts %s", ", ".join(parts),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if trainable == 0:
        raise ValueError(f"finetune.train {parts} matched no parameter of {family.name}")
    return trainable


def upcast_trainable(model) -> int:
    """Every trainable bf16/fp16 parameter to float32 in place (frozen ones keep their dtype); returns how many."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return 0  # partitioned weights: DeepSpeed keeps the float32 master partitions in its optimizer
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    if n:
        log.info("%d trainable tensors kept in float32 (master weights; autocast computes in half precision)", n)
    return n


def add_lora(loaded, parts: list[str] | None = None) -> int:
    """Wrap ``loaded.model`` (a ``dsocr.loading.Loaded``) in a LoRA adapter on the language model.

    Args:
        loaded: The loaded base model.
        parts: ``projector`` / ``vision`` to train in full beside the adapter (``config.trained_parts``).

    Returns:
        The number of trainable parameters.
    """
    from peft import LoraConfig, get_peft_model

    lora = loaded.cfg.lora
    targets = loaded.family.lora_targets(loaded.model, list(lora.target_modules))
    # Vision/projector unfrozen on request: trained in full and saved inside the adapter folder
    # (modules_to_save), so a checkpoint stays self-contained; frozen (the seed's recipe) by default.
    if parts is None:
        from dsocr.config import trained_parts

        parts = trained_parts(loaded.cfg)
    saved = part_modules(loaded.family, parts)
    extra = {"modules_to_save": saved} if saved else {}
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", **targets, **extra)
    loaded.model = get_peft_model(loaded.model, peft_config)
    trainable = sum(_numel(p) for p in loaded.model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in loaded.model.parameters())
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
