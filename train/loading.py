"""The one model-loading path shared by training, ``eval_ppl.py`` and ``eval_cer.py``.

``load_base`` loads tokenizer + model through the config's family; ``add_lora`` wraps it for training;
``load_for_eval`` accepts either a base model (hub id / folder, config given separately) or a LoRA
checkpoint folder, which carries its own ``run_config.yaml`` and needs nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import CONFIG_FILE_NAME, RunConfig, load_saved_config
from train.models import ModelFamily, get_family

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` = bfloat16 on a CUDA device that supports it, else float32 (CPU bf16 is slow and lossy)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    on_cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda")
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    """What every entry script needs: the config, the family, tokenizer and model."""

    cfg: RunConfig
    family: ModelFamily
    tokenizer: Any
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    adapter: str | None = None  # checkpoint folder the LoRA adapter came from, if any


def load_base(cfg: RunConfig, device: torch.device | None = None) -> Loaded:
    """Tokenizer and base model named by ``cfg.model`` (hub id or folder), in the resolved dtype."""
    family = get_family(cfg.model.family)
    dtype = resolve_dtype(cfg.model.dtype, device)
    tokenizer = family.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    model = family.load_model(
        cfg.model.name_or_path, cfg.model.revision, dtype=dtype, attn_implementation=cfg.model.attn_implementation
    )
    if cfg.model.train_vision and not family.vision_module_names:
        raise ValueError(f"model.train_vision is not supported by family {family.name!r}; set it to false")
    return Loaded(cfg=cfg, family=family, tokenizer=tokenizer, model=model)


def add_lora(loaded: Loaded) -> int:
    """Wrap ``loaded.model`` in a PEFT LoRA adapter on the language model; return the trainable count."""
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


def is_checkpoint(path: str | Path) -> bool:
    """A pipeline checkpoint: a folder with a LoRA adapter and the run config beside it."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / CONFIG_FILE_NAME).is_file()


def load_for_eval(ckpt: str, cfg: RunConfig | None = None, overrides: list[str] | None = None,
                  device: torch.device | None = None) -> Loaded:
    """Load a base model or a LoRA checkpoint for evaluation, in eval mode on ``device``.

    Args:
        ckpt: A pipeline checkpoint folder (``checkpoint-N`` or a run's ``final``: self-describing), or a
            base model id/folder (then ``cfg`` supplies data and eval settings).
        cfg: The run config to use with a base model. Ignored for checkpoints except for ``data``/``eval``
            overrides given in ``overrides``.
        overrides: ``key=value`` strings applied on top of a checkpoint's saved config.
        device: Where to put the model (default: CUDA if available).
    """
    from peft import PeftModel

    device = device or default_device()
    path = Path(ckpt)
    if path.exists() and path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        if not (path / CONFIG_FILE_NAME).is_file():
            raise FileNotFoundError(
                f"--ckpt {ckpt!r} has an adapter but no {CONFIG_FILE_NAME}: it is not a checkpoint of this "
                "pipeline, or it is half-written. To fix: pass a complete checkpoint-N folder."
            )
        saved = load_saved_config(path, overrides)
        loaded = load_base(saved, device)
        _check_adapter_base(path, saved)
        loaded.model = PeftModel.from_pretrained(loaded.model, str(path), is_trainable=False)
        loaded.adapter = str(path)
    elif path.exists() and path.is_dir() and (path / CONFIG_FILE_NAME).is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--ckpt {ckpt!r} is a run folder, not a checkpoint; pass one of its checkpoint-N folders "
            f"({', '.join(sorted(p.name for p in path.glob('checkpoint-*'))) or 'none saved yet'})"
        )
    else:
        if cfg is None:
            raise ValueError(
                f"--ckpt {ckpt!r} is not a pipeline checkpoint (no {ADAPTER_CONFIG} + {CONFIG_FILE_NAME}); to "
                "evaluate a base model also pass --config FILE for the data and eval settings"
            )
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"--ckpt {ckpt!r} exists but holds no model (no config.json, no adapter)")
        cfg.model.name_or_path = str(ckpt)
        loaded = load_base(cfg, device)
    loaded.model.to(device).eval()
    return loaded


def _check_adapter_base(path: Path, cfg: RunConfig) -> None:
    """Refuse an adapter trained on another base model than the one its config names."""
    import json

    adapter = json.loads((path / ADAPTER_CONFIG).read_text())
    trained_on = adapter.get("base_model_name_or_path")
    if trained_on and Path(str(trained_on)).name != Path(cfg.model.name_or_path).name:
        raise ValueError(
            f"checkpoint {str(path)!r} holds an adapter for base model {trained_on!r} but its config names "
            f"{cfg.model.name_or_path!r}; pass model.name_or_path={trained_on} or the matching checkpoint"
        )
