"""Export a LoRA checkpoint as a standalone model folder in the official layout, or as a plain PEFT adapter.

    export_checkpoint("runs/x/checkpoint-500", "exports/x-500")                    # merged, bf16
    export_checkpoint("runs/x/final", "exports/x", dtype="float32", force=True)    # merged, fp32, replace
    export_checkpoint("runs/x/final", "exports/x-lora", adapter_only=True)         # LoRA adapter only

A merged export loads with ``from_pretrained`` exactly like the base model (docs/EXPORT.md has the layout
and why each file is what it is):

* ``config.json``: the base's own file, byte for byte. Our native v1 class would save a config without
  the fields the official code and vLLM read (``auto_map``, ``vision_config``, ...), so the export never
  writes its own; only a base folder that has no hub-style config (our tiny test models) gets one built
  with every field of the hub file (``v1_hub_config``), plus the explicit sizes our class needs.
* weights: safetensors with the base checkpoint's key names and shapes, the LoRA merged into each weight
  (for v1 into every expert's own Linear; PEFT's ``merge_and_unload``), sharded with a
  ``model.safetensors.index.json`` above ``max_shard_size``. The merge is done in float32 and rounded to
  the export dtype once. The written keys are checked against the base checkpoint's.
* the tokenizer files, the processor files and the remote-code ``.py`` files the base has;
* ``run_config.yaml`` (the training run's settings: ``infer/predict.py`` reads prompt and image mode
  from it) and ``README.md``, a model card.

Everything is written into ``.tmp-export-<name>`` beside the output and renamed at the end, so an
interrupted export never leaves a folder that looks complete. Checks run before any model loads: an
incomplete checkpoint, an adapter whose base differs from ``base``, an existing output (without
``force``) and a disk too small for the estimated size are refused with the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from dsocr.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TMP_PREFIX,
    TRAINER_STATE,
    TRASH_PREFIX,
    checkpoint_problem,
    list_checkpoints,
    looks_like_hub_id,
    model_path_problem,
)
from dsocr.config import CONFIG_FILE_NAME, load_saved_config

log = logging.getLogger(__name__)

EXPORT_DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "generation_config.json")
# The official v1 repository's remote code (``auto_map`` points at it); copied when the base has it.
REMOTE_CODE_FILES = ("modeling_deepseekocr.py", "deepencoder.py", "modeling_deepseekv2.py",
                     "configuration_deepseek_v2.py", "conversation.py")
# Fields every hub-style v1 config.json has; a base config lacking one of them is one of our own saves.
V1_HUB_FIELDS = ("architectures", "auto_map", "candidate_resolutions", "global_view_pos", "language_config",
                 "model_type", "projector_config", "tile_tag", "vision_config")
# Language-model fields the hub file carries at the top level and again under language_config.
V1_HUB_LM_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
    "first_k_dense_replace", "topk_method", "n_group", "topk_group", "use_mla", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings", "bos_token_id",
    "eos_token_id", "lm_head", "rm_head",
)
V1_AUTO_MAP = {"AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
               "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM"}
# Where each family's language model lives in adapter keys: a plain LM adapter holds nothing else.
LM_KEY_MARKER = {"deepseek_ocr_v1": ".model.layers.", "deepseek_ocr2": ".language_model."}
# Image tokens per v1 text line (docs/MODEL_NOTES.md §3), for the model card's serving note.
V1_MODE_TOKENS = {"tiny": "73", "small": "111", "base": "273", "large": "421",
                  "gundam": "273 (+ 640 px tiles when a side exceeds 640 px)"}


class ExportError(ValueError):
    """An export cannot be done as asked; the message names the value and the fix."""


# ------------------------------------------------------------------ small file helpers


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def base_file(name_or_path: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of the base model: from its folder, or from the hub cache for a hub id; None if it has none."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(found) if found else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (the index's shards, or ``model.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def base_weight_shapes(name_or_path: str, revision: str | None = None) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the base checkpoint's weights (local folder or hub cache); None if not at hand."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = weight_files(path)
    else:
        index = base_file(name_or_path, "model.safetensors.index.json", revision)
        if index is not None:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [base_file(name_or_path, n, revision) for n in names]
        else:
            files = [base_file(name_or_path, "model.safetensors", revision)]
        if any(f is None for f in files):
            return None
    return weight_shapes(files) if files else None  # type: ignore[arg-type]


def _fingerprint(folder: Path) -> str:
    """config.json plus the first and last tensor of a model folder, hashed: tells two copies from two models."""
    from safetensors import safe_open

    h = hashlib.sha256((folder / "config.json").read_bytes())
    files = weight_files(folder)
    for file in (files[0], files[-1]) if files else ():
        with safe_open(str(file), "pt") as f:
            keys = sorted(f.keys())
            for key in (keys[0], keys[-1]):
                h.update(key.encode())
                h.update(f.get_tensor(key).float().numpy().tobytes())
    return h.hexdigest()


def same_base(trained_on: str, base: str) -> bool:
    """Whether ``base`` is the model an adapter was trained on.

    The same folder, or the same name (a hub id ``owner/Name`` and a local copy ``.../Name``; this is the
    rule ``dsocr.loading`` applies when it loads an adapter). Two local folders of the same name must also
    hold the same model (config and sample tensors): two random tiny models share a name and a config.
    """
    a, b = Path(trained_on).expanduser(), Path(base).expanduser()
    if a.name != b.name:
        return False
    if a.is_dir() and b.is_dir() and a.resolve() != b.resolve():
        try:
            return _fingerprint(a) == _fingerprint(b)
        except (OSError, ValueError):
            return False
    return True


def _free_bytes(path: Path) -> tuple[int, Path]:
    """Free space on the file system that ``path`` (or its nearest existing parent) is on."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


# ------------------------------------------------------------------ the checks before anything loads


def export_checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` cannot be exported (with the fix), or None.

    Exportable = a LoRA checkpoint of this pipeline with its adapter config, its run config and adapter
    weights that read back completely (a save cut off by a full disk leaves a truncated safetensors file).
    """
    from safetensors import safe_open

    ckpt = str(ckpt)
    if (problem := checkpoint_problem(ckpt)) is not None:
        return problem.replace("--ckpt", "--ckpt (to export)", 1)
    path = Path(ckpt)
    if not (path / ADAPTER_CONFIG).is_file():
        return (f"--ckpt {ckpt!r} is a model folder, not a LoRA checkpoint (no {ADAPTER_CONFIG}): there is "
                "nothing to merge. To fix: pass a checkpoint of a run, e.g. runs/<run>/checkpoint-N or runs/<run>/final.")
    weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    if weights is None or weights.suffix != ".safetensors":
        return (f"checkpoint {ckpt!r} has no adapter_model.safetensors (found: "
                f"{weights.name if weights else 'nothing'}). To fix: re-save it with this pipeline's trainer.")
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            for key in keys:  # reading every tensor is what detects a truncated file
                f.get_slice(key)[...]
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for broken files
        return (f"checkpoint {ckpt!r} is not complete: {weights.name} cannot be read ({e}); the save was cut "
                "off. To fix: export another checkpoint of the run (dsocr keeps the previous ones), or re-run "
                "training with resume_from_checkpoint=latest.")
    if not keys:
        return f"checkpoint {ckpt!r} is not complete: {weights.name} holds no tensor. To fix: export another checkpoint."
    return None


def estimate_bytes(*, base: str, revision: str | None, ckpt: Path, dtype: str, adapter_only: bool) -> tuple[int, int] | None:
    """``(bytes, parameters)`` the export will write, from safetensors headers; None if the base is not at hand."""
    itemsize = 2 if dtype == "bfloat16" else 4
    if adapter_only:
        shapes = weight_shapes([ckpt / ADAPTER_WEIGHTS[0]])
        extra = 0
    else:
        shapes = base_weight_shapes(base, revision)
        if shapes is None:
            return None
        folder = Path(base).expanduser()
        extra = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix != ".safetensors") if folder.is_dir() else 0
    params = sum(math.prod(s) for s in shapes.values())
    return params * itemsize + extra + (1 << 20), params


def check_disk(out: Path, needed: int, params: int, dtype: str) -> None:
    """Refuse when the file system of ``out`` has less free space than ``needed`` (+2% and 64 MB margin)."""
    free, where = _free_bytes(out)
    margin = int(needed * 1.02) + (64 << 20)
    if free < margin:
        cheaper = " or --dtype bfloat16 (half the size of float32)" if dtype == "float32" else ""
        raise ExportError(
            f"not enough disk space for the export: {str(out)!r} needs about {_human(margin)} ({params:,} parameters "
            f"in {dtype}, with margin), {_human(free)} are free on {str(where)!r}. To fix: free space, pass --out on "
            f"a larger disk{cheaper}."
        )


def _check_output(out: Path, force: bool, protected: list[Path]) -> None:
    resolved = out.expanduser().resolve()
    for keep in protected:
        keep = keep.expanduser().resolve()
        if resolved == keep or keep.is_relative_to(resolved):
            raise ExportError(f"--out {str(out)!r} is (or contains) {str(keep)!r}, which the export reads; writing "
                              "there would destroy it. To fix: pass another --out folder.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file. To fix: pass a folder path (it is created).")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {str(out)!r} already exists and is not empty. To fix: pass another --out, or "
                          "--force to replace it (the old folder is removed only once the new one is complete).")


# ------------------------------------------------------------------ metrics and the model card


def checkpoint_metrics(ckpt: Path) -> dict[str, Any]:
    """What the run recorded about ``ckpt``: step, last evaluation, best checkpoint; ``source`` names the file.

    A ``checkpoint-N`` has its ``trainer_state.json``; a run's ``final/`` has none, so the run folder's
    ``all_results.json`` (the final metrics of ``train_lora.py``) is read instead. The evaluation before
    training (``eval_before_*``) is only in ``all_results.json``, written when the run ended.
    """
    results_file = ckpt.parent / "all_results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    before = {k.replace("eval_before_", "eval_"): v for k, v in results.items() if k.startswith("eval_before_")}
    state_file = ckpt / TRAINER_STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        evals = [e for e in state.get("log_history", []) if any(k.startswith("eval_") for k in e)]
        if not before and len(evals) > 1:
            before = evals[0]
        return {"source": f"{ckpt.name}/{TRAINER_STATE}", "step": state.get("global_step"),
                "eval": evals[-1] if evals else {}, "before": before,
                "best_metric": state.get("best_metric"), "best_checkpoint": state.get("best_model_checkpoint")}
    if results:
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(ckpt.parent)]
        return {"source": f"{ckpt.parent.name}/all_results.json", "step": max(steps) if steps else None,
                "eval": {k: v for k, v in results.items() if k.startswith("eval_") and not k.startswith("eval_before_")},
                "before": before, "best_metric": None, "best_checkpoint": results.get("best_model_checkpoint")}
    return {"source": None}


def _metric_rows(metrics: dict) -> list[str]:
    names = (("eval_cer", "CER (raw)"), ("eval_cer_norm", "CER (normalised)"), ("eval_line_acc", "line accuracy"),
             ("eval_perplexity", "perplexity"), ("eval_loss", "loss (mean NLL per target token)"))
    rows = []
    for key, label in names:
        now, before = metrics.get("eval", {}).get(key), metrics.get("before", {}).get(key)
        if now is None:
            continue
        fmt = (lambda v: f"{v:.4g}") if key != "eval_line_acc" else (lambda v: f"{v:.4f}")
        rows.append(f"| {label} | {fmt(before) if before is not None else '—'} | {fmt(now)} |")
    return rows


def model_card(*, family: str, cfg, ckpt: Path, base: str, dtype: str, adapter_only: bool, config_note: str,
               metrics: dict) -> str:
    """The ``README.md`` of an export: base, data, recipe, metrics, prompt, image mode and what it means for serving."""
    revision = cfg.model.revision or "not pinned (the revision at download time)"
    mode = cfg.collator.image_mode
    default_mode = "gundam"
    mode = default_mode if mode == "default" else mode
    training = dict(cfg.training)
    bs, accum = training.get("per_device_train_batch_size", "?"), training.get("gradient_accumulation_steps", 1)
    hub_base = base if looks_like_hub_id(base) else None
    front = ["---", f"base_model: {hub_base}" if hub_base else f"# base_model: {base} (a local folder)",
             "library_name: " + ("peft" if adapter_only else "transformers"),
             "pipeline_tag: image-text-to-text", "language: [zh]",
             "tags: [ocr, deepseek-ocr, lora" + (", merged" if not adapter_only else "") + "]", "---", ""]
    what = "LoRA adapter (language model only)" if adapter_only else f"merged model ({dtype})"
    lines = front + [
        f"# {ckpt.parent.name}/{ckpt.name}: {'DeepSeek-OCR v1' if family == 'deepseek_ocr_v1' else 'DeepSeek-OCR-2'} "
        f"fine-tuned with LoRA, {what}",
        "",
        f"Exported from the checkpoint `{ckpt}` by `infer/export.py` on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Base model",
        "",
        f"* `{base}` (family `{family}`), revision {revision}.",
        f"* {config_note}",
        "",
        "## Data",
        "",
        f"* dataset `{cfg.data.dataset}`: trained on split `{cfg.data.train_split}`"
        + (f" (first {cfg.data.max_train_samples} rows)" if cfg.data.max_train_samples else "")
        + f", evaluated on `{cfg.data.eval_split}`" + (f" (first {cfg.data.max_eval_samples} rows)" if cfg.data.max_eval_samples else "") + ".",
        f"* labels up to {cfg.data.max_label_chars} characters; images up to {cfg.data.max_image_pixels:,} pixels, "
        f"aspect ratio up to {cfg.data.max_image_aspect:g}:1.",
        "",
        "## Recipe",
        "",
        f"* LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout} on "
        f"{', '.join(cfg.lora.target_modules)} of the language model"
        + (" (every routed expert adapted separately)" if family == "deepseek_ocr_v1" else
           " (the fused routed experts through PEFT target_parameters)")
        + ("; vision towers and projector trained in full" if cfg.model.train_vision else "; vision frozen") + ".",
        f"* learning rate {training.get('learning_rate', '?')}, {training.get('lr_scheduler_type', 'linear')} schedule, "
        f"warm-up {training.get('warmup_steps', 0)} steps, {training.get('max_steps', '?')} steps of batch {bs} x "
        f"accumulation {accum}, model dtype {cfg.model.dtype}, seed {cfg.seed}.",
        "",
        "## Metrics",
        "",
    ]
    if metrics.get("source"):
        step = metrics.get("step")
        lines += [f"Recorded by the training run in `{metrics['source']}`" + (f", step {step}" if step is not None else "")
                  + f"; eval split `{cfg.data.eval_split}` (CER on `eval.train_cer_samples` = {cfg.eval.train_cer_samples} lines):", ""]
        rows = _metric_rows(metrics)
        lines += (["| metric | before fine-tuning | this checkpoint |", "|---|---|---|", *rows] if rows
                  else ["(no evaluation was recorded)"])
        if metrics.get("best_checkpoint"):
            lines += ["", f"Best checkpoint of the run: `{metrics['best_checkpoint']}`"
                      + (f" (metric {metrics['best_metric']:.4g})" if metrics.get("best_metric") is not None else "") + "."]
    else:
        lines += ["No training metrics were found beside the checkpoint."]
    lines += ["", "Score it on a test split with `python eval/eval_cer.py --ckpt <this folder> --config <run config>`.", ""]
    lines += ["## Prompt and image mode", "", f"* prompt: `{cfg.collator.instruction!r}`"]
    if family == "deepseek_ocr_v1":
        lines += [f"* image mode: **{mode}** ({V1_MODE_TOKENS.get(mode, '?')} image tokens per text line)."]
        if mode == "gundam":
            lines += ["* Serving: stock vLLM preprocesses every image in Gundam mode (1024 px global view plus 640 px "
                      "tiles), the mode this model was trained in: its inputs match training."]
        else:
            lines += [f"* **Serving: stock vLLM always preprocesses in Gundam mode** (1024 px global view plus 640 px "
                      f"tiles, 273 or more image tokens per line), not the {mode} mode this model was fine-tuned in. "
                      "Served that way it sees other inputs than in training and its accuracy will differ from the "
                      "numbers above (usually for the worse). Serve it with this repository's `infer/predict.py` / "
                      f"`infer/app.py` (they use {mode}), or fine-tune in Gundam mode for vLLM."]
    else:
        lines += [f"* image mode: **{mode}**.", "* Serving: the official OCR-2 preprocessing is `gundam` (global view plus up to 6 tiles); "
                  + ("this model was trained in it." if mode == "gundam" else
                     f"this model was trained in `{mode}`, so a server with the official preprocessing feeds it "
                     "other inputs than in training.")]
    lines += ["", "## Use", ""]
    if adapter_only:
        lines += ["A plain PEFT LoRA adapter restricted to the language model (vLLM `--enable-lora` covers only "
                  "the language model; expert LoRA needs a vLLM with fused-MoE LoRA support):", "", "```python",
                  "from peft import PeftModel", "model = PeftModel.from_pretrained(base_model, '<this folder>')",
                  "```"]
    else:
        lines += ["```bash", "python infer/predict.py --ckpt <this folder> image.png scans/ document.pdf --out predictions.jsonl",
                  "python infer/app.py --ckpt <this folder>", "```", ""]
        if family == "deepseek_ocr_v1":
            lines += ["Loads with `DeepseekOCRForCausalLM.from_pretrained('<this folder>')` (this repository, "
                      "transformers 5) like the base; vLLM reads the same folder (`model_type` deepseek_vl_v2). "
                      "Recommended vLLM settings: temperature 0, its n-gram repetition guard, prefix caching and the "
                      "multimodal processor cache off."]
        else:
            lines += ["Loads with `transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained('<this folder>')` "
                      "like the base."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ configs and side files


def v1_hub_config(config, dtype: str, saved: dict | None = None) -> dict:
    """A hub-style ``config.json`` for a v1 model: every field of the official file, plus our explicit sizes.

    The official file carries the language-model fields at the top level and again under ``language_config``
    (vLLM builds its decoder config from that one), ``vision_config`` / ``projector_config`` (read by the
    official code and vLLM, informational for the towers' sizes, which the official code hard-codes), the
    image-geometry fields ``candidate_resolutions``, ``tile_tag``, ``global_view_pos``, ``architectures``,
    ``model_type`` ``deepseek_vl_v2`` and an ``auto_map`` for the remote code. Our class's own fields
    (SAM/CLIP sizes, ``moe_implementation``) are kept beside them: the hub readers ignore them, and our
    class needs them to load towers that are not the official size.

    Args:
        config: A ``DeepseekOCRConfig``.
        dtype: The export dtype (``torch_dtype`` of the file).
        saved: The ``config.json`` our class saved for this model (default: what it would save now); its
            fields are kept beside the hub's.
    """
    import transformers

    ours = dict(saved) if saved is not None else config.to_diff_dict()
    ours.update({key: getattr(config, key) for key in V1_HUB_LM_FIELDS})
    lm = {key: ours[key] for key in V1_HUB_LM_FIELDS} | {"torch_dtype": dtype}
    hub = lm | {
        "architectures": ["DeepseekOCRForCausalLM"],
        "auto_map": dict(V1_AUTO_MAP),
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "language_config": dict(lm),
        "model_type": "deepseek_vl_v2",
        "projector_config": {"input_dim": config.projector_input_dim, "model_type": "mlp_projector",
                             "n_embed": config.hidden_size, "projector_type": "linear"},
        "tile_tag": "2D",
        "transformers_version": transformers.__version__,
        "vision_config": {
            "image_size": config.sam_image_size,
            "mlp_ratio": 3.7362,  # the official file's (informational) value
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {
                "clip-l-14-224": {"heads": config.clip_heads, "image_size": config.clip_image_size,
                                  "layers": config.clip_layers, "patch_size": config.clip_patch_size,
                                  "width": config.clip_width},
                "sam_vit_b": {"downsample_channels": list(config.sam_downsample_channels),
                              "global_attn_indexes": list(config.sam_global_attn_indexes),
                              "heads": config.sam_heads, "layers": config.sam_depth, "width": config.sam_width},
            },
        },
    }
    # "dtype" is transformers 5's spelling of torch_dtype: one of them, the hub's, is enough.
    extra = {k: v for k, v in ours.items() if k not in hub and k not in ("dtype", "_name_or_path")}
    return dict(sorted((extra | hub).items()))


def _write_config(family: str, base: str, revision: str | None, model, dtype: str, tmp: Path) -> str:
    """Write ``config.json``; return one sentence for the model card saying where it came from."""
    source = base_file(base, "config.json", revision)
    if source is None:
        raise ExportError(f"the base model {base!r} has no config.json at hand. To fix: pass --base with the "
                          "local base model folder.")
    raw = source.read_bytes()
    if family == "deepseek_ocr_v1" and not all(k in json.loads(raw) for k in V1_HUB_FIELDS):
        cfg = v1_hub_config(model.config, dtype, saved=json.loads(raw))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return ("`config.json` built with every field of the official hub file (the base folder's own config "
                "lacked them: a model made by this repository), plus this model's explicit tower sizes.")
    (tmp / "config.json").write_bytes(raw)
    return "`config.json` is the base model's file, byte for byte."


def _copy_side_files(base: str, revision: str | None, tokenizer, tmp: Path) -> list[str]:
    """Tokenizer, processor and remote-code files of the base; ``special_tokens_map.json`` made if missing."""
    copied = []
    names = list(TOKENIZER_FILES + PROCESSOR_FILES)
    folder = Path(base).expanduser()
    names += [p.name for p in sorted(folder.glob("*.py"))] if folder.is_dir() else list(REMOTE_CODE_FILES)
    for name in names:
        src = base_file(base, name, revision)
        if src is not None:
            shutil.copyfile(src, tmp / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        tokenizer.save_pretrained(tmp)
        copied.append("tokenizer (saved from the loaded one)")
    if not (tmp / "special_tokens_map.json").is_file():
        # transformers 5 no longer writes it; vLLM and older loaders still read it.
        special = dict(tokenizer.special_tokens_map)
        first = tokenizer.convert_tokens_to_ids("<image>")  # the OCR tokens: <image> ... <|Assistant|>
        special["additional_special_tokens"] = [tok.content for i, tok in sorted(tokenizer.added_tokens_decoder.items())
                                                if first is not None and i >= first]
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
        copied.append("special_tokens_map.json (written)")
    return copied


# ------------------------------------------------------------------ the two exports


def _merged(ckpt: Path, base: str, cfg, dtype: str, max_shard_size: str, device: str, tmp: Path) -> str:
    import torch

    from dsocr.loading import load_for_eval

    # float32 for the merge whatever the checkpoint ran in: W + s * B @ A is formed once at full precision
    # and rounded to the export dtype once (a bf16 merge would round the base, the delta and their sum).
    loaded = load_for_eval(str(ckpt), overrides=["model.dtype=float32", f"model.name_or_path={base}"],
                           device=torch.device(device))
    merged = loaded.model.merge_and_unload()
    state = merged.state_dict()
    leftovers = [k for k in state if "lora_" in k or ".base_layer." in k or k.startswith("base_model.")]
    if leftovers:
        raise ExportError(f"merging left adapter tensors in the model ({leftovers[:3]}): this PEFT version cannot "
                          "merge this adapter. To fix: use the pinned peft (requirements.txt) or --adapter-only.")
    merged.to(device="cpu", dtype=getattr(torch, dtype))
    base_shapes = base_weight_shapes(base, cfg.model.revision)
    # transformers 5 converts some checkpoints on load (OCR-2's fused experts) and, by default, converts back
    # on save: keep whichever layout the base checkpoint itself has.
    native = base_shapes is not None and set(base_shapes) == set(state)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=not native)
    for written in ("config.json", "generation_config.json"):  # ours lack the hub fields: the base's are copied
        (tmp / written).unlink(missing_ok=True)
    shapes = weight_shapes(weight_files(tmp))
    if base_shapes is not None and shapes != base_shapes:
        missing, extra = sorted(set(base_shapes) - set(shapes)), sorted(set(shapes) - set(base_shapes))
        wrong = sorted(k for k in set(shapes) & set(base_shapes) if shapes[k] != base_shapes[k])
        raise ExportError(f"the exported weights do not match the base checkpoint's layout: {len(missing)} keys "
                          f"missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]}), {len(wrong)} with "
                          f"other shapes (e.g. {wrong[:2]}). This is a bug of the export; the checkpoint is fine.")
    note = _write_config(loaded.family.name, base, cfg.model.revision, merged, dtype, tmp)
    _copy_side_files(base, cfg.model.revision, loaded.tokenizer, tmp)
    return note


def _adapter_only(ckpt: Path, family: str, base: str, adapter_cfg: dict, dtype: str, tmp: Path) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / ADAPTER_WEIGHTS[0]))
    marker = LM_KEY_MARKER[family]
    outside = sorted(k for k in state if marker not in k)
    if outside or adapter_cfg.get("modules_to_save"):
        raise ExportError(
            f"checkpoint {str(ckpt)!r} also trains modules outside the language model ({len(outside)} tensors, e.g. "
            f"{outside[:2]}; modules_to_save {adapter_cfg.get('modules_to_save')}): an adapter restricted to the "
            "language model would drop them. To fix: export it merged (without --adapter-only)."
        )
    target = getattr(torch, dtype)
    state = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(tmp / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    plain = dict(adapter_cfg)
    # A plain adapter: the base by the name it is known under, no pointer to this repository's classes.
    plain.update(base_model_name_or_path=base, inference_mode=True, modules_to_save=None)
    plain.pop("auto_mapping", None)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return f"A plain PEFT adapter for `{base}`: apply it to that base model."


def export_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str = "bfloat16", adapter_only: bool = False,
                      force: bool = False, base: str | None = None, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
                      device: str = "cpu") -> Path:
    """Export ``ckpt`` to ``out``: a merged standalone model (default) or a plain PEFT adapter.

    Args:
        ckpt: A LoRA checkpoint of this pipeline (``checkpoint-N`` or ``final``).
        out: The folder to write (must not exist or be empty, unless ``force``).
        dtype: ``bfloat16`` (the official checkpoint's) or ``float32``.
        adapter_only: Write only the LoRA adapter, restricted to the language model.
        force: Replace an existing ``out`` (only once the new export is complete).
        base: The base model expected (hub id or folder). An adapter trained on another base is refused; a
            base that moved since training is found here. Default: the base the run config names.
        max_shard_size: Largest safetensors file, e.g. ``5GB``; bigger models get shards + an index.
        device: Where the merge runs (``cpu`` needs no accelerator: a 3B model in float32 takes 13 GB RAM).

    Returns:
        ``out``.

    Raises:
        ExportError: Anything the export refuses, with the value and the fix (before any model loads).
    """
    ckpt, out = Path(ckpt), Path(out)
    started = time.perf_counter()
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    # ---------------------------------------------------------------- what is exported, from which base
    if (problem := export_checkpoint_problem(ckpt)) is not None:
        raise ExportError(problem)
    try:
        cfg = load_saved_config(ckpt)
    except ValueError as e:
        raise ExportError(f"checkpoint {str(ckpt)!r}: its {CONFIG_FILE_NAME} is not valid: {e}") from None
    adapter_cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    trained_on = adapter_cfg.get("base_model_name_or_path") or cfg.model.name_or_path
    if base is not None and not same_base(trained_on, base):
        raise ExportError(
            f"checkpoint {str(ckpt)!r} holds an adapter trained on base model {trained_on!r}, but --base is "
            f"{base!r}. To fix: pass --base {trained_on} (or a copy of that model under the same folder name), "
            f"or export a checkpoint of a run on {base!r}."
        )
    base = base or cfg.model.name_or_path
    if not adapter_only and (problem := model_path_problem(base)) is not None:
        raise ExportError(f"{problem} To fix an adapter whose base moved: pass --base PATH (the base model folder).")
    _check_output(out, force, [ckpt] + ([Path(base)] if Path(base).expanduser().exists() else []))
    # ---------------------------------------------------------------- room on the disk
    estimate = estimate_bytes(base=base, revision=cfg.model.revision, ckpt=ckpt, dtype=dtype, adapter_only=adapter_only)
    if estimate is not None:
        check_disk(out, *estimate, dtype)
    log.info("exporting %s (%s, %s) from base %s to %s%s", ckpt, "adapter only" if adapter_only else "merged",
             dtype, base, out, f", about {_human(estimate[0])}" if estimate else "")
    # ---------------------------------------------------------------- write into a temporary, then publish
    tmp = out.parent / f"{TMP_PREFIX}export-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous export of this folder that was interrupted
    tmp.mkdir(parents=True)
    try:
        if adapter_only:
            note = _adapter_only(ckpt, cfg.model.family, base, adapter_cfg, dtype, tmp)
        else:
            note = _merged(ckpt, base, cfg, dtype, max_shard_size, device, tmp)
        shutil.copyfile(ckpt / CONFIG_FILE_NAME, tmp / CONFIG_FILE_NAME)  # the training run's settings
        card = model_card(family=cfg.model.family, cfg=cfg, ckpt=ckpt, base=base, dtype=dtype, adapter_only=adapter_only,
                          config_note=note, metrics=checkpoint_metrics(ckpt))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():  # empty, or replaced with force: the old one goes only now that the new one is complete
            trash = out.parent / f"{TRASH_PREFIX}export-{out.name}"
            shutil.rmtree(trash, ignore_errors=True)
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s in %.1f s", out, time.perf_counter() - started)
    return out
