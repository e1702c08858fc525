"""Run configuration: one YAML file fully describes a run, ``key=value`` arguments refine it.

    python train/train_lora.py --config configs/v1_lora_zh.yaml training.learning_rate=5e-5 lora.r=32

The schema below is the single source of types, defaults and documentation. Loading is strict: an
unknown or misspelled key, a wrong type or a missing required value fails before any model or data is
touched, and all problems are reported at once with the valid alternatives. The ``training:`` block is
passed verbatim to ``transformers.TrainingArguments`` (which validates its own field names), so this
file never keeps a drifting copy of HF's options.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.images import DEFAULT_LIMITS, DEFAULT_MAX_LABEL_CHARS, ImageLimits

CONFIG_FILE_NAME = "run_config.yaml"
RESUME_MODES = ("latest", "auto")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars.

    ``1e-4`` is a float (YAML 1.1 reads a string, which breaks AdamW) and only true/false are booleans
    (YAML 1.1 turns ``eval_strategy: no`` into False).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.\d*|\.\d+)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A run configuration is invalid; the message lists every problem and how to fix it."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    family: str = MISSING  # deepseek_ocr_v1 | deepseek_ocr2 (dsocr/models/__init__.py)
    name_or_path: str = MISSING  # hub id (deepseek-ai/DeepSeek-OCR) or a local checkpoint folder
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducible runs
    # auto = bfloat16 on a bf16-capable GPU, float32 on CPU | float32 | bfloat16 | float16 (cards without
    # bf16, e.g. T4/V100: needs training.fp16=true, the loss scaling). Frozen weights stay in this dtype;
    # whatever trains is kept in float32 (master weights, fp32 optimizer state) under autocast.
    dtype: str = "auto"
    attn_implementation: str = "sdpa"  # sdpa | eager
    # Let PyTorch's SDPA pick cuDNN's fused attention (its first choice on H100/H200). Off by default: on one
    # H200 through train_lora.py every layout ran faster without it (Gundam 64 x 1: 81.1 vs 47.8 samples/s,
    # the shipped 8 x 1: 36.8 vs 31.0, Tiny 128: 312.8 vs 288.9; README, speed). cuDNN builds an execution
    # plan for each new shape, and OCR batches bring a new sequence length nearly every step.
    cudnn_attention: bool = False
    # v1 only: SAM's attention through FlexAttention (compiled at the first forward, then reused) on CUDA
    # wherever no gradient flows through the vision towers (frozen vision, evaluation, prediction), instead of
    # the SDPA call with the relative-position bias folded into 128 extra head columns (README, speed).
    flex_vision_attention: bool = False
    # Same as finetune.train: [vision, projector] (the vision towers + projector trained in full beside
    # the LoRA adapter, saved with it); frozen by default.
    train_vision: bool = False


FINETUNE_METHODS = ("lora", "full")
FINETUNE_PARTS = ("language_model", "projector", "vision")
FULL_DEFAULT_PARTS = ["language_model", "projector"]


@dataclass
class FinetuneConfig:
    """What training changes: a LoRA adapter (the seed's recipe) or the weights themselves (full)."""

    method: str = "lora"  # lora: adapter on the language model | full: the parts below trained in full
    # Parts trained in full: language_model | projector | vision (SAM/CLIP or the OCR-2 encoder). null =
    # the method's default: lora [] (adapter only; add projector/vision to train them beside it), full
    # [language_model, projector] (vision frozen, as in the seed). A full run saves whole models.
    train: list[str] | None = None


@dataclass
class LoraSettings:
    """PEFT LoRA adapter on the language model only (the family restricts the targets)."""

    r: int = 16  # rank: capacity vs memory
    alpha: int = 16  # scaling = alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class DataConfig:
    """Where the text-line images and their labels come from (formats: data/loader.py)."""

    dataset: str = MISSING  # hub id, local parquet folder, JSONL manifest or image folder
    train_split: str = "train"
    eval_split: str = "val"  # priyank-m/chinese_text_recognition calls it "val", not "validation"
    column_map: dict[str, str] = field(default_factory=dict)  # e.g. {image: img, text: label}
    image_root: str | None = None  # base folder for relative image paths in manifests
    max_train_samples: int | None = None  # for debugging: first N rows
    max_eval_samples: int | None = None
    on_bad_record: str = "error"  # error: stop at the first bad record | skip: count, log, continue
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS  # longer labels are bad records (also data.check's limit)
    max_image_pixels: int = DEFAULT_LIMITS.max_pixels  # width * height, read from the header before decoding
    min_image_side: int = DEFAULT_LIMITS.min_side  # a narrower or lower image carries no readable text
    max_image_aspect: float = DEFAULT_LIMITS.max_aspect  # long side / short side (20000x20 strips are broken)
    allow_paths_outside_root: bool = False  # manifest paths that leave the image root (../../x) are refused


@dataclass
class CollatorConfig:
    """How a record becomes model input (collator/deepseek_ocr.py)."""

    image_mode: str = "default"  # family's modes (v1: tiny|small|base|large|gundam); default = family's
    instruction: str = "<image>\nFree OCR."  # the official OCR prompt; must contain <image> once


@dataclass
class EvalSettings:
    """Generation and metrics for eval_cer.py, eval_ppl.py and CER during training."""

    split: str = "test"  # split scored by eval_cer.py / eval_ppl.py
    max_samples: int | None = None  # None = whole split
    batch_size: int = 16  # lines per generate() call (left-padded)
    max_new_tokens: int | None = None  # None = sized from the data: longest reference (tokens) * 2 + 8
    no_repeat_ngram_size: int = 20  # the official repetition guard (0 disables)
    num_workers: int | None = None  # processes preprocessing the next generation batches; None = 0 on CPU, else <= 8
    train_cer_samples: int = 64  # fixed eval-split subset scored with CER at each eval_steps (0 = off)
    nfkc: bool = True  # normalised CER: NFKC (full/half width, ￥ -> ¥)
    remove_whitespace: bool = True  # normalised CER: drop all whitespace
    lowercase: bool = False  # normalised CER: lower-case (FudanVI does)


@dataclass
class RunConfig:
    """One fine-tuning run. Every field is documented above; ``training`` goes to TrainingArguments."""

    output_dir: str = MISSING  # run folder: checkpoints, logs, resolved config, metrics
    seed: int = 42
    # null: a fresh run (an output_dir with checkpoints is refused by nothing: they are left alone) |
    # latest: the newest complete checkpoint, an error if there is none | auto: latest if there is one,
    # else a fresh run (for requeued jobs) | path/to/checkpoint-N
    resume_from_checkpoint: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # read only when finetune.method is lora
    data: DataConfig = field(default_factory=DataConfig)
    collator: CollatorConfig = field(default_factory=CollatorConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    training: dict[str, Any] = field(default_factory=dict)  # transformers.TrainingArguments fields


# TrainingArguments fields this schema owns: setting them under training: would be ambiguous.
_OWNED_TRAINING_KEYS = {
    "output_dir": "output_dir",
    "seed": "seed",
    "resume_from_checkpoint": "resume_from_checkpoint",
    "remove_unused_columns": "(always False: the collator needs the raw records)",
}


def _unknown_keys(raw: Any, schema: type, prefix: str = "") -> list[str]:
    """Every key of ``raw`` that ``schema`` does not define, with the valid keys and a close match."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return problems
    by_name = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            hint = difflib.get_close_matches(str(key), by_name, n=1)
            problems.append(
                f"unknown key '{path}'"
                + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
                + f"; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(by_name)}"
            )
            continue
        sub = by_name[key].default_factory if by_name[key].default_factory is not MISSING else None
        sub_type = type(sub()) if callable(sub) else None
        if sub_type is not None and is_dataclass(sub_type) and isinstance(value, dict):
            problems.extend(_unknown_keys(value, sub_type, prefix=f"{path}."))
    return problems


def _parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` strings to a nested dict, values parsed as YAML (so 1e-4, null, [a, b] work)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise ConfigError(
                f"cannot parse argument {item!r}: use key=value, e.g. training.learning_rate=1e-4 "
                "(only --config takes a flag)"
            )
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a non-mapping value")
        node[parts[-1]] = _yaml_load(value) if value != "" else ""
    return nested


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply ``key=value`` overrides and validate everything up front.

    Args:
        path: The YAML file.
        overrides: ``key=value`` strings (``training.*`` keys go to TrainingArguments).

    Returns:
        A typed ``RunConfig`` (an OmegaConf structured config: attribute access, types enforced).

    Raises:
        ConfigError: Listing every unknown key, wrong type, missing value and invalid choice together.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. To fix: pass --config configs/<name>.yaml")
    with path.open(encoding="utf-8") as f:
        raw = _yaml_load(f.read()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw = _deep_merge(raw, _parse_overrides(list(overrides or [])))

    problems = _unknown_keys(raw, RunConfig)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(raw))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:  # wrong type, e.g. lora.r=eight
        raise ConfigError(f"{path}: {e.msg if hasattr(e, 'msg') else e}".strip()) from None
    if missing:
        raise ConfigError(f"{path}: required keys without a value: {', '.join(missing)}")
    validate(cfg, source=str(path))
    return cfg  # type: ignore[return-value]


def validate(cfg: RunConfig | DictConfig, source: str = "config") -> None:
    """Check choices and cross-field rules that types alone cannot express; report all together."""
    from dsocr.models import FAMILY_IMAGE_MODES, FAMILY_NAMES  # light: no model code is imported

    problems = []
    if cfg.model.family not in FAMILY_NAMES:
        problems.append(f"model.family {cfg.model.family!r} is not one of {', '.join(FAMILY_NAMES)}")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"model.dtype {cfg.model.dtype!r} is not one of auto, float32, bfloat16, float16")
    problems.extend(_finetune_problems(cfg))
    if cfg.model.attn_implementation not in ("sdpa", "eager"):
        problems.append(f"model.attn_implementation {cfg.model.attn_implementation!r} is not one of sdpa, eager")
    if cfg.data.on_bad_record not in ("error", "skip"):
        problems.append(f"data.on_bad_record {cfg.data.on_bad_record!r} is not one of error, skip")
    if cfg.collator.instruction.count("<image>") != 1:
        problems.append(
            f"collator.instruction {cfg.collator.instruction!r} must contain '<image>' exactly once "
            "(the official prompt is '<image>\\nFree OCR.')"
        )
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        problems.append(f"lora.r ({cfg.lora.r}) and lora.alpha ({cfg.lora.alpha}) must be positive")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout {cfg.lora.dropout} must be in [0, 1)")
    if cfg.eval.batch_size <= 0:
        problems.append(f"eval.batch_size {cfg.eval.batch_size} must be positive")
    resume = cfg.resume_from_checkpoint
    if resume not in (None, *RESUME_MODES) and not Path(resume).is_dir():
        problems.append(
            f"resume_from_checkpoint {resume!r} is not a folder; use null, latest, auto or a path to checkpoint-N"
        )
    modes = FAMILY_IMAGE_MODES.get(cfg.model.family)
    if modes and cfg.collator.image_mode not in ("default", *modes):
        hint = difflib.get_close_matches(cfg.collator.image_mode, modes, n=1)
        problems.append(
            f"collator.image_mode {cfg.collator.image_mode!r} is not one of default, {', '.join(modes)} for "
            f"{cfg.model.family}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    d = cfg.data
    if d.max_label_chars <= 0 or d.max_image_pixels <= 0 or d.min_image_side <= 0 or d.max_image_aspect < 1:
        problems.append(
            f"data limits must be positive (max_label_chars {d.max_label_chars}, max_image_pixels "
            f"{d.max_image_pixels}, min_image_side {d.min_image_side}) and max_image_aspect >= 1 ({d.max_image_aspect})"
        )
    best = cfg.training.get("metric_for_best_model")
    evaluating = cfg.training.get("eval_strategy", "no") != "no"
    if evaluating and best in ("eval_cer", "eval_cer_norm", "eval_line_acc") and cfg.eval.train_cer_samples <= 0:
        problems.append(
            f"training.metric_for_best_model {best!r} needs CER during training: set eval.train_cer_samples > 0 "
            "or pick eval_loss"
        )
    for key, owner in _OWNED_TRAINING_KEYS.items():
        if key in cfg.training:
            problems.append(f"training.{key} is not allowed here; it is set by {owner}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def trained_parts(cfg: RunConfig | DictConfig) -> list[str]:
    """The parts trained in full (``finetune.train`` resolved: method default, ``model.train_vision``)."""
    ft = cfg.finetune
    parts = list(ft.train) if ft.train is not None else (list(FULL_DEFAULT_PARTS) if ft.method == "full" else [])
    if cfg.model.train_vision:
        parts += [p for p in ("vision", "projector") if p not in parts]
    return [p for p in FINETUNE_PARTS if p in parts]  # canonical order, no duplicates


def _finetune_problems(cfg) -> list[str]:
    """``finetune.*`` choices and the mixed-precision rules that go with ``model.dtype``."""
    problems = []
    ft, training = cfg.finetune, cfg.training
    if ft.method not in FINETUNE_METHODS:
        problems.append(f"finetune.method {ft.method!r} is not one of {', '.join(FINETUNE_METHODS)}")
        return problems
    bad = [p for p in (ft.train or []) if p not in FINETUNE_PARTS]
    if bad:
        problems.append(f"finetune.train {bad} is not a subset of {', '.join(FINETUNE_PARTS)}")
    parts = trained_parts(cfg)
    if ft.method == "lora" and "language_model" in parts:
        problems.append("finetune.train lists language_model with finetune.method lora (the adapter is the language "
                        "model's training); to train its weights in full set finetune.method=full")
    if ft.method == "full" and not parts:
        problems.append("finetune.method full with finetune.train [] trains nothing; list parts from "
                        f"{', '.join(FINETUNE_PARTS)} (or null for the default {FULL_DEFAULT_PARTS})")
    bf16, fp16 = bool(training.get("bf16", False)), bool(training.get("fp16", False))
    dtype = cfg.model.dtype
    if dtype == "float16" and (not fp16 or bf16):
        problems.append("model.dtype float16 needs training.fp16=true (autocast + loss scaling: float16 gradients "
                        "underflow without it) and training.bf16=false")
    if dtype == "bfloat16" and parts and not bf16:
        problems.append(f"model.dtype bfloat16 with parts trained in full ({', '.join(parts)}) needs training.bf16=true: "
                        "the trained weights are kept in float32 (master copy) and bf16 autocast runs the "
                        "frozen bf16 layers around them")
    if fp16 and dtype == "bfloat16":
        problems.append("training.fp16=true with model.dtype bfloat16: use training.bf16=true, or model.dtype float16")
    return problems


def image_limits(cfg: RunConfig) -> ImageLimits:
    """The run's image limits (``data.max_image_pixels`` & co.), as ``data.images.open_image`` takes them."""
    d = cfg.data
    return ImageLimits(max_pixels=d.max_image_pixels, min_side=d.min_image_side, max_aspect=d.max_image_aspect)


def training_arguments(cfg: RunConfig, **extra: Any):
    """Build ``transformers.TrainingArguments`` from ``cfg.training`` (verbatim) plus the owned fields.

    Done before any model loads so that a misspelled ``training.*`` key fails in seconds.
    """
    from transformers import TrainingArguments

    kwargs = dict(OmegaConf.to_container(cfg.training, resolve=True)) if not isinstance(cfg.training, dict) else dict(cfg.training)
    valid = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        hints = [
            f"'training.{k}'" + (f" (did you mean 'training.{m[0]}'?)" if (m := difflib.get_close_matches(k, valid, n=1)) else "")
            for k in unknown
        ]
        raise ConfigError(
            f"unknown TrainingArguments field(s): {', '.join(hints)}. Valid names: see "
            "transformers.TrainingArguments (e.g. learning_rate, per_device_train_batch_size, save_steps)"
        )
    kwargs.update(output_dir=cfg.output_dir, seed=cfg.seed, remove_unused_columns=False, **extra)
    # No buffer of either family changes in training (rotary tables only), so DDP need not re-broadcast them
    # at every forward (v1's pooled expert adapters keep ~4,000 buffer views of their weights).
    kwargs.setdefault("ddp_broadcast_buffers", False)

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {e}") from None


def save_config(cfg: RunConfig, folder: str | Path) -> Path:
    """Write the resolved config as ``run_config.yaml`` into ``folder`` (run dir or checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / CONFIG_FILE_NAME
    out.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    return out


def load_saved_config(folder: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load the config saved in a run folder or checkpoint (the checkpoint is self-describing).

    ``resume_from_checkpoint`` is reset to null: evaluation never resumes, and the path it named when
    training may be gone.
    """
    return load_config(Path(folder) / CONFIG_FILE_NAME, ["resume_from_checkpoint=null", *(overrides or [])])


def parse_cli(argv: list[str] | None = None) -> RunConfig:
    """``--config FILE key=value ...`` to a validated ``RunConfig``; exits with a message on error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("error: --config needs a file, e.g. --config configs/tiny_cpu.yaml")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise SystemExit(__doc__)
        else:
            overrides.append(arg)
        i += 1
    if config_path is None:
        raise SystemExit("error: --config FILE is required, e.g. --config configs/tiny_cpu.yaml")
    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
