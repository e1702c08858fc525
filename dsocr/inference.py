r"""Prediction with a model of this pipeline: the evaluation's loading and generation, for unlabelled images.

    predictor = load_predictor("runs/x/checkpoint-500")       # LoRA checkpoint, exported folder or base model
    rows = predictor.predict([("receipt.png", image)])        # [{"id", "text", "confidence", "new_tokens"}]
    for row in predict_inputs(predictor, files):              # files, PDFs page by page, bad ones as errors
        ...

Used by ``infer/predict.py``, ``infer/app.py`` and ``bench/infer_gpu.py``. A model is loaded through
``dsocr.loading.load_for_eval`` and transcribed with ``dsocr.generation.generate_batched`` (greedy, left-padded
batches, the official no-repeat-n-gram guard), so a line gets the same text and confidence here as in
``eval/eval_cer.py``. What ``--ckpt`` may be:

* a LoRA checkpoint of this pipeline (``checkpoint-N``, ``final``): its ``run_config.yaml`` says everything;
* a folder written by ``infer/export.py``: a standalone model whose ``run_config.yaml`` is the training
  run's (prompt, image mode, limits); it is loaded as a base model from the folder itself;
* a base model id or folder: the family is read from its ``config.json`` (``model_type``), every other
  setting is the schema default unless a run config is given.

Prompt and image mode default to what the model was trained with (``collator.instruction``,
``collator.image_mode``); both can be overridden. ``PROMPTS`` names the two official prompts: ``line``
(``<image>\nFree OCR.``, a text line) and ``document`` (the official prompt for a whole page to markdown).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.convert import ASSISTANT_ROLE, DEFAULT_INSTRUCTION, USER_ROLE
from data.images import ImageLimits
from dsocr.checkpoints import CheckpointError, checkpoint_kind, checkpoint_problem, is_checkpoint
from dsocr.config import CONFIG_FILE_NAME, RunConfig, image_limits, load_config, load_saved_config

log = logging.getLogger(__name__)

PROMPTS = {
    "line": DEFAULT_INSTRUCTION,
    "document": "<image>\n<|grounding|>Convert the document to markdown.",
}
# The official inference settles on 8,192 new tokens for a page; a text line needs far fewer.
DOCUMENT_MAX_NEW_TOKENS = 8192
# ``model_type`` in config.json -> family. The official v1 class writes "DeepseekOCR"; the hub file says
# deepseek_vl_v2 (docs/MODEL_NOTES.md §1).
FAMILY_BY_MODEL_TYPE = {"deepseek_vl_v2": "deepseek_ocr_v1", "DeepseekOCR": "deepseek_ocr_v1",
                        "deepseek_ocr2": "deepseek_ocr2"}


def model_kind(ckpt: str) -> str:
    """``checkpoint`` (a training checkpoint), ``exported`` (``infer/export.py``'s folder) or ``base``.

    A full fine-tuning checkpoint and a merged export both hold config.json, weights and the run config;
    the export alone has the model card (``README.md``) and no Trainer state beside its weights.
    """
    path = Path(ckpt)
    with_run_config = (path / "config.json").is_file() and (path / CONFIG_FILE_NAME).is_file()
    export_card = (path / "README.md").is_file() and not (path / "trainer_state.json").is_file()
    if is_checkpoint(path) and not (checkpoint_kind(path) == "full" and export_card):
        return "checkpoint"
    return "exported" if with_run_config else "base"


def read_model_config(name_or_path: str, revision: str | None = None) -> dict:
    """The ``config.json`` of a model folder or hub id (the hub cache is used; nothing is downloaded offline)."""
    path = Path(name_or_path)
    if path.is_dir():
        file = path / "config.json"
    else:
        from transformers.utils import cached_file

        try:
            file = Path(cached_file(name_or_path, "config.json", revision=revision))
        except OSError as e:
            raise CheckpointError(
                f"cannot read config.json of {name_or_path!r}: {e}. To fix: pass a local model folder, a LoRA "
                "checkpoint, or run once with hub access so that the model is in the hub cache."
            ) from None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable config.json ({e}). To fix: re-download the model.") from None


def base_config(name_or_path: str, revision: str | None = None) -> RunConfig:
    """A run config for a bare base model: the family from its ``config.json``, schema defaults elsewhere."""
    from omegaconf import OmegaConf

    from dsocr.config import validate

    model_type = read_model_config(name_or_path, revision).get("model_type")
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise CheckpointError(
            f"{name_or_path!r} has model_type {model_type!r} in its config.json, not one of "
            f"{', '.join(FAMILY_BY_MODEL_TYPE)}: not a DeepSeek-OCR model. To fix: pass a DeepSeek-OCR (v1 or 2) "
            "model, a LoRA checkpoint of this pipeline, or --config FILE naming the family."
        )
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "output_dir": ".",  # required by the schema; prediction writes no run folder
        "model": {"family": family, "name_or_path": str(name_or_path), "revision": revision},
        "data": {"dataset": "(none: prediction)"},
    })
    validate(cfg, source=f"defaults for {name_or_path}")
    return cfg  # type: ignore[return-value]


def resolve_prompt(prompt: str | None, default: str) -> str:
    """``line`` / ``document`` -> the official prompts; any other text as given; None -> ``default``."""
    text = default if prompt is None else PROMPTS.get(prompt, prompt)
    if text.count("<image>") != 1:
        raise ValueError(
            f"--prompt {text!r} must contain '<image>' exactly once (where the image goes), e.g. "
            f"{PROMPTS['line']!r}; or pass --prompt line / --prompt document"
        )
    return text


@dataclass
class Predictor:
    """A loaded model ready to transcribe images, with the settings it was trained with (or overrides).

    Attributes:
        name: Display name (the checkpoint's folder names).
        ckpt: What ``--ckpt`` named.
        kind: ``checkpoint``, ``exported`` or ``base``.
        loaded: The ``dsocr.loading.Loaded`` model.
        collator: The generation collator for ``image_mode``.
        settings: Greedy generation settings (batch size, max new tokens, no-repeat n-gram).
        prompt: The instruction given with every image.
        device: Where the model runs.
    """

    name: str
    ckpt: str
    kind: str
    loaded: Any
    collator: Any
    settings: Any
    prompt: str
    device: Any

    @property
    def cfg(self) -> RunConfig:
        """The run config: the checkpoint's own, or the defaults for a base model."""
        return self.loaded.cfg

    @property
    def image_mode(self) -> str:
        """The image mode every image is preprocessed in."""
        return self.loaded.image_mode

    @property
    def limits(self) -> ImageLimits:
        """The run's image limits (``data.max_image_pixels`` & co.), applied to every input."""
        return image_limits(self.cfg)

    def describe(self) -> str:
        """One line: which model, family, image mode, prompt and generation settings."""
        return (f"{self.name} ({self.kind}, {self.loaded.family.name}): image mode {self.image_mode}, prompt "
                f"{self.prompt!r}, batch {self.settings.batch_size}, max_new_tokens {self.settings.max_new_tokens}")

    def records(self, images: list[tuple[str, Any]]) -> list[dict]:
        """Conversation records (``data.convert`` layout) for ``(id, RGB image)`` pairs, without answers."""
        return [{"id": rid, "messages": [{"role": USER_ROLE, "content": self.prompt, "images": [image]},
                                         {"role": ASSISTANT_ROLE, "content": ""}]} for rid, image in images]

    def predict(self, images: list[tuple[str, Any]], progress: bool = False) -> list[dict]:
        """Transcribe ``(id, RGB image)`` pairs; results in input order.

        Returns:
            One ``{"id", "text", "new_tokens", "confidence": {"mean", "min"}}`` per image.
        """
        from dsocr.generation import generate_batched

        if not images:
            return []
        preds = generate_batched(self.loaded.model, self.collator, self.records(images), self.settings,
                                 self.device, progress=progress)
        return [{"id": p["id"], "text": p["hypothesis"], "new_tokens": p["new_tokens"],
                 "confidence": {"mean": p["confidence_mean"], "min": p["confidence_min"]}} for p in preds]


def display_name(ckpt: str) -> str:
    """``run_checkpoint-N`` for a checkpoint (as eval_cer names it), the folder or id name otherwise."""
    parts = Path(ckpt).parts
    if len(parts) >= 2 and parts[-1].startswith(("checkpoint-", "final")):
        return "_".join(parts[-2:])
    return parts[-1] if parts else str(ckpt)


def load_predictor(ckpt: str, *, config: str | None = None, prompt: str | None = None,
                   image_mode: str | None = None, max_new_tokens: int | None = None,
                   batch_size: int | None = None, device=None, name: str | None = None) -> Predictor:
    """Load ``ckpt`` (LoRA checkpoint, exported folder or base model) for prediction.

    Args:
        ckpt: The model (see the module docstring).
        config: A run config YAML for a base model (family, limits, eval settings); ignored for checkpoints
            and exported folders, which carry their own.
        prompt: ``line``, ``document`` or the instruction text; default: what the model was trained with.
        image_mode: One of the family's modes; default: the training mode.
        max_new_tokens: Default 8,192 for the document prompt (a page; ``eval.max_new_tokens`` is sized for
            lines), else ``eval.max_new_tokens`` if set, else 2 x ``data.max_label_chars`` + 8 (the
            evaluation's sizing rule applied to the longest label the run accepts).
        batch_size: Images per ``generate`` call; default ``eval.batch_size``.
        device: Default: CUDA if available.
        name: Display name; default from the folder names.

    Raises:
        CheckpointError: The model cannot be found or loaded (the message names the fix).
        ValueError: A prompt without ``<image>``, an image mode the family does not have, a bad size.
    """
    from dsocr.devices import default_device
    from dsocr.generation import GenerationSettings
    from dsocr.loading import load_for_eval

    if (problem := checkpoint_problem(ckpt)) is not None:
        raise CheckpointError(problem)
    device = device or default_device()
    kind = model_kind(ckpt)
    if kind == "checkpoint":
        loaded = load_for_eval(ckpt, device=device)
    else:
        if kind == "exported":  # the training run's settings; the weights are the folder itself
            cfg = load_saved_config(ckpt, [f"model.name_or_path={ckpt}", "model.revision=null"])
        elif config is not None:
            cfg = load_config(config)
        else:
            cfg = base_config(ckpt)
        loaded = load_for_eval(ckpt, cfg=cfg, device=device)
    if image_mode is not None:
        modes = loaded.family.image_modes
        if image_mode not in modes:
            raise ValueError(f"--image-mode {image_mode!r} is not one of {', '.join(modes)} for "
                             f"{loaded.family.name}")
        loaded.cfg.collator.image_mode = image_mode
    instruction = resolve_prompt(prompt, loaded.cfg.collator.instruction)
    ev = loaded.cfg.eval
    if max_new_tokens is None:
        max_new_tokens = (DOCUMENT_MAX_NEW_TOKENS if instruction == PROMPTS["document"]
                          else ev.max_new_tokens or 2 * loaded.cfg.data.max_label_chars + 8)
    if max_new_tokens <= 0 or (batch_size is not None and batch_size <= 0):
        raise ValueError(f"--max-new-tokens ({max_new_tokens}) and --batch-size ({batch_size}) must be positive")
    settings = GenerationSettings(batch_size=batch_size or ev.batch_size, max_new_tokens=int(max_new_tokens),
                                  no_repeat_ngram_size=ev.no_repeat_ngram_size, num_workers=ev.num_workers)
    predictor = Predictor(name=name or display_name(ckpt), ckpt=str(ckpt), kind=kind, loaded=loaded,
                          collator=loaded.make_collator(train=False), settings=settings, prompt=instruction,
                          device=device)
    log.info("loaded %s", predictor.describe())
    return predictor


def count_items(files: list[Path]) -> int:
    """Images plus PDF pages in ``files`` (a PDF that does not open counts once: its error)."""
    from dsocr.inputs import is_pdf, pdf_page_count

    total = 0
    for path in files:
        pages = pdf_page_count(path) if is_pdf(path) else 1
        total += pages if isinstance(pages, int) else 1
    return total


def predict_inputs(predictor: Predictor, files: list[Path], *, pdf_dpi: int | None = None,
                   window: int | None = None, progress: bool = True) -> Iterator[dict]:
    """Predict every image and PDF page of ``files``; yield one row per item, in input order.

    Images are decoded lazily in windows of ``window`` good images (default 4 batches), so a folder of
    100,000 scans or a 500-page PDF never sits in memory at once, while ``generate_batched`` can still sort
    each window by image size. A bad file or page yields an error row and the others go on.

    Yields:
        ``{"path", "page", "text", "seconds", "confidence": {"mean", "min"}, "new_tokens"}`` per prediction
        (``seconds``: the wall time of its window, decoding included, divided by the window's images), or
        ``{"path", "page", "error", "message"}`` per bad input. ``page`` counts from 1 (None for images).
    """
    from tqdm.auto import tqdm

    from dsocr.inputs import DEFAULT_PDF_DPI, load_items

    window = window or 4 * predictor.settings.batch_size
    bar = tqdm(total=count_items(files), desc="predict", unit="img", disable=not progress)
    pending: list[tuple[Any, Any, Any]] = []  # (item, image or None, error or None), in input order
    started = time.perf_counter()

    def flush() -> Iterator[dict]:
        nonlocal started
        good = [(item.id, image) for item, image, _ in pending if image is not None]
        preds = {p["id"]: p for p in predictor.predict(good)}
        seconds = (time.perf_counter() - started) / max(len(good), 1)
        for item, _, error in pending:
            if error is not None:
                yield {"path": item.path, "page": item.page, "error": error.reason, "message": error.line()}
            else:
                p = preds[item.id]
                yield {"path": item.path, "page": item.page, "text": p["text"], "seconds": round(seconds, 4),
                       "confidence": p["confidence"], "new_tokens": p["new_tokens"]}
        bar.update(len(pending))
        pending.clear()
        started = time.perf_counter()

    try:
        n_good = 0
        for item, image, error in load_items(files, limits=predictor.limits, pdf_dpi=pdf_dpi or DEFAULT_PDF_DPI):
            pending.append((item, image, error))
            n_good += image is not None
            if n_good >= window:
                yield from flush()
                n_good = 0
        if pending:
            yield from flush()
    finally:
        bar.close()
