"""The one model-loading path shared by training, ``eval_ppl.py``, ``eval_cer.py`` and every later script.

``load_base`` loads tokenizer + model through the config's family; ``dsocr.adapters.prepare_training`` makes
it trainable (LoRA or full); ``load_for_eval`` accepts a base model (hub id / folder, config given
separately), a LoRA checkpoint folder or a full fine-tuning checkpoint folder (a whole model): both kinds
of checkpoint carry their own ``run_config.yaml`` and need nothing else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsocr.adapters import load_adapter
from dsocr.checkpoints import (
    ADAPTER_CONFIG,
    CheckpointError,
    checkpoint_kind,
    checkpoint_problem,
    model_path_problem,
)
from dsocr.config import CONFIG_FILE_NAME, RunConfig, load_saved_config
from dsocr.devices import default_device, resolve_dtype
from dsocr.models import ModelFamily, get_family
from dsocr.versions import check_versions

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What every entry script needs: the config, the family, tokenizer and model."""

    cfg: RunConfig
    family: ModelFamily
    tokenizer: Any
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    adapter: str | None = None  # checkpoint folder the LoRA adapter came from, if any

    @property
    def image_mode(self) -> str:
        """``collator.image_mode``, with ``default`` resolved to the family's default mode."""
        mode = self.cfg.collator.image_mode
        return self.family.default_image_mode if mode == "default" else mode

    def make_collator(self, train: bool = True):
        """The run's ``DeepSeekOCRDataCollator``: sizes and ids from the (base) model config."""
        from collator.deepseek_ocr import DeepSeekOCRDataCollator

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return DeepSeekOCRDataCollator(
            tokenizer=self.tokenizer, family=self.family, image_processor=self.family.image_processor(base, self.image_mode, self.cfg.model.revision),
            image_token_id=self.family.image_token_id(base), train=train,
            supervised_logits_only=self.family.supports_logits_to_keep,
        )


def load_base(cfg: RunConfig, device: torch.device | None = None) -> Loaded:
    """Tokenizer and base model named by ``cfg.model`` (hub id or folder), in the resolved dtype."""
    check_versions()
    if (problem := model_path_problem(cfg.model.name_or_path)) is not None:
        raise CheckpointError(problem)
    family = get_family(cfg.model.family)
    dtype = resolve_dtype(cfg.model.dtype, device)
    cudnn_attention = cfg.model.cudnn_attention
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)  # process-wide: see ModelConfig
    tokenizer = family.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    model = family.load_model(
        cfg.model.name_or_path, cfg.model.revision, dtype=dtype, attn_implementation=cfg.model.attn_implementation
    )
    if cfg.model.flex_vision_attention:
        switched = [m for m in model.modules() if hasattr(m, "use_flex")]
        if not switched:
            raise ValueError(f"model.flex_vision_attention is not supported by family {family.name!r} (v1's SAM "
                             "only); set it to false")
        for m in switched:
            m.use_flex = True
    if cfg.model.train_vision and not family.vision_module_names:
        raise ValueError(f"model.train_vision is not supported by family {family.name!r}; set it to false")
    if dtype == torch.float16 and not torch.cuda.is_available():
        log.warning("model.dtype float16 on CPU: fp16 autocast and loss scaling are meant for GPUs")
    return Loaded(cfg=cfg, family=family, tokenizer=tokenizer, model=model)


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
    device = device or default_device()
    path = Path(ckpt)
    if (problem := checkpoint_problem(ckpt)) is not None:
        raise CheckpointError(problem)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        saved = load_saved_config(path, overrides)
        _check_adapter_base(path, saved)  # before loading: a mismatch fails in a second, not after minutes
        loaded = load_base(saved, device)
        loaded.model = load_adapter(loaded.model, path)
        loaded.adapter = str(path)
    elif path.is_dir() and checkpoint_kind(path) == "full" and (path / CONFIG_FILE_NAME).is_file():
        # A full fine-tuning checkpoint: the folder is the model; its run config says how it was trained.
        saved = load_saved_config(path, [*(overrides or []), f"model.name_or_path={path}", "model.revision=null"])
        loaded = load_base(saved, device)
    else:
        if cfg is None:
            raise CheckpointError(
                f"--ckpt {ckpt!r} is not a pipeline checkpoint (no {ADAPTER_CONFIG} + {CONFIG_FILE_NAME}); to "
                "evaluate a base model also pass --config FILE for the data and eval settings"
            )
        cfg.model.name_or_path = str(ckpt)
        loaded = load_base(cfg, device)
    loaded.model.to(device).eval()
    return loaded


def _check_adapter_base(path: Path, cfg: RunConfig) -> None:
    """Refuse an adapter trained on another base model than the one its config names."""
    adapter = json.loads((path / ADAPTER_CONFIG).read_text())
    trained_on = adapter.get("base_model_name_or_path")
    if trained_on and Path(str(trained_on)).name != Path(cfg.model.name_or_path).name:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an adapter trained on base model {trained_on!r} but its "
            f"{CONFIG_FILE_NAME} names {cfg.model.name_or_path!r}. To fix: add the override "
            f"model.name_or_path={trained_on}, or evaluate a checkpoint of a run on {cfg.model.name_or_path!r}"
        )
