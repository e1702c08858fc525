"""The one model-loading path shared by training, ``eval_ppl.py`` and ``eval_cer.py``.

``load_base`` loads tokenizer + model through the config's family; ``add_lora`` wraps it for training;
``load_for_eval`` accepts either a base model (hub id / folder, config given separately) or a LoRA
checkpoint folder, which carries its own ``run_config.yaml`` and needs nothing else.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import CONFIG_FILE_NAME, RunConfig, load_saved_config
from train.models import ModelFamily, get_family

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


# Minimum versions the code relies on (requirements.txt pins the tested ones).
MIN_VERSIONS = {
    "transformers": "5.14.0",  # DeepSeek-OCR-2 native, Trainer/PEFT behaviour we build on
    "peft": "0.21.0",  # target_parameters for OCR-2's fused experts
    "torch": "2.6.0",
}


def check_versions() -> None:
    """Fail early, naming the package and the fix, when an installed version is too old."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    problems = []
    for name, minimum in MIN_VERSIONS.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (need >= {minimum})")
            continue
        if Version(have.split("+")[0]) < Version(minimum):
            problems.append(f"{name} {have} < {minimum}")
    if problems:
        raise RuntimeError("; ".join(problems) + ". To fix: pip install -r requirements.txt")


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
            tokenizer=self.tokenizer, family=self.family, image_processor=self.family.image_processor(base, self.image_mode),
            image_token_id=self.family.image_token_id(base), train=train,
            supervised_logits_only=self.family.supports_logits_to_keep,
        )


def load_base(cfg: RunConfig, device: torch.device | None = None) -> Loaded:
    """Tokenizer and base model named by ``cfg.model`` (hub id or folder), in the resolved dtype."""
    check_versions()
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


class CheckpointError(ValueError):
    """A ``--ckpt`` folder is not a usable checkpoint; the message names the path and the fix."""


def is_checkpoint(path: str | Path) -> bool:
    """A pipeline checkpoint: a folder with a LoRA adapter and the run config beside it."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / CONFIG_FILE_NAME).is_file()


def _usable_siblings(run_dir: Path) -> str:
    """The checkpoints of a run folder that hold adapter + weights + config, newest first, for hints."""
    found = [p for p in run_dir.glob("*") if p.is_dir() and (p.name == "final" or re.fullmatch(r"checkpoint-\d+", p.name))
             and is_checkpoint(p) and any((p / w).is_file() for w in ADAPTER_WEIGHTS)]
    found.sort(key=lambda p: (p.name != "final", -int(p.name.split("-")[1]) if p.name != "final" else 0))
    return ", ".join(str(p) for p in found) or f"none in {str(run_dir)!r} yet"


def checkpoint_problem(ckpt: str) -> str | None:
    """Why ``ckpt`` (a local folder) cannot be evaluated, with the fix; None if it can or is a hub id.

    Catches, before any model loads: a missing path, a run folder, a temporary of an interrupted save, a
    half-written checkpoint (adapter without run config or without weights) and an empty folder.
    """
    path = Path(ckpt)
    fix = "To fix: pass a complete checkpoint folder"
    if not path.exists():
        hub_like = ckpt.count("/") == 1 and not ckpt.startswith((".", "/", "~")) and not path.parent.is_dir()
        if hub_like:
            return None  # a hub id such as deepseek-ai/DeepSeek-OCR: loading will tell
        return f"--ckpt {ckpt!r} does not exist. {fix}, e.g. runs/<run>/checkpoint-N or runs/<run>/final."
    if not path.is_dir():
        return f"--ckpt {ckpt!r} is a file, not a folder. {fix} (the folder that holds {ADAPTER_CONFIG})."
    if path.name.startswith((".tmp-", ".trash-")):
        return (f"--ckpt {ckpt!r} is the temporary folder of an interrupted checkpoint save or rotation, not a "
                f"checkpoint. {fix}; usable: {_usable_siblings(path.parent)}.")
    has_adapter, has_cfg = (path / ADAPTER_CONFIG).is_file(), (path / CONFIG_FILE_NAME).is_file()
    if has_adapter and not has_cfg:
        return (f"--ckpt {ckpt!r} has {ADAPTER_CONFIG} but no {CONFIG_FILE_NAME}: a half-written checkpoint or "
                f"one not made by this pipeline. {fix}; usable: {_usable_siblings(path.parent)}.")
    if has_adapter and not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        return (f"--ckpt {ckpt!r} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
                f"a half-written checkpoint. {fix}; usable: {_usable_siblings(path.parent)}.")
    if has_cfg and not has_adapter and not (path / "config.json").is_file():
        return (f"--ckpt {ckpt!r} is a run folder, not a checkpoint. {fix} of that run: "
                f"{_usable_siblings(path)}.")
    if not has_adapter and not (path / "config.json").is_file():
        return (f"--ckpt {ckpt!r} holds no model: neither {ADAPTER_CONFIG} (a LoRA checkpoint) nor config.json "
                f"(a base model). {fix}, or a base model folder with --config FILE.")
    return None


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


def _check_adapter_base(path: Path, cfg: RunConfig) -> None:
    """Refuse an adapter trained on another base model than the one its config names."""
    import json

    adapter = json.loads((path / ADAPTER_CONFIG).read_text())
    trained_on = adapter.get("base_model_name_or_path")
    if trained_on and Path(str(trained_on)).name != Path(cfg.model.name_or_path).name:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an adapter trained on base model {trained_on!r} but its "
            f"{CONFIG_FILE_NAME} names {cfg.model.name_or_path!r}. To fix: add the override "
            f"model.name_or_path={trained_on}, or evaluate a checkpoint of a run on {cfg.model.name_or_path!r}"
        )
