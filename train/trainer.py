"""Trainer pieces: exact perplexity + CER at each evaluation, self-describing checkpoints, resume.

``OCRTrainer.evaluate`` replaces HF's evaluation loop (which averages per-batch mean losses) with the
exact corpus NLL over target tokens, and adds CER / line accuracy on a small fixed subset of the eval
split, so ``metric_for_best_model: eval_cer`` can pick the best checkpoint by what users care about.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from collator.deepseek_ocr import DeepSeekOCRDataCollator
from eval.common import GenerationSettings, corpus_nll, generate_batched, max_new_tokens_for
from eval.metrics import perplexity
from train.config import RunConfig, save_config

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class OCRTrainer(Trainer):
    """``Trainer`` whose evaluation reports exact perplexity and, on a fixed subset, CER."""

    def __init__(self, *args, run_cfg: RunConfig, cer_records: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_cfg = run_cfg
        self.cer_records = cer_records or []

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Exact eval loss/perplexity over all target tokens, plus CER on ``cer_records``."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        collator: DeepSeekOCRDataCollator = self.data_collator
        device = self.args.device
        start = time.perf_counter()
        records = [dataset[i] for i in range(len(dataset))]
        total, tokens = corpus_nll(self.model, collator, records, self.args.per_device_eval_batch_size, device)
        metrics = {
            f"{metric_key_prefix}_loss": total / max(tokens, 1),
            f"{metric_key_prefix}_perplexity": perplexity(total, tokens),
            f"{metric_key_prefix}_target_tokens": tokens,
        }
        if self.cer_records:
            from eval.metrics import NormalizeConfig, score_lines

            ev = self.run_cfg.eval
            settings = GenerationSettings(
                batch_size=ev.batch_size,
                max_new_tokens=max_new_tokens_for(
                    collator.tokenizer, [r["messages"][1]["content"] for r in self.cer_records if r], ev.max_new_tokens
                ),
                no_repeat_ngram_size=ev.no_repeat_ngram_size,
            )
            preds = generate_batched(self.model, collator, self.cer_records, settings, device, progress=False)
            corpus, _ = score_lines(
                [p["reference"] for p in preds], [p["hypothesis"] for p in preds],
                prompt_phrases=(self.run_cfg.collator.instruction,), normalize_cfg=NormalizeConfig(nfkc=ev.nfkc, remove_whitespace=ev.remove_whitespace,
                                              lowercase=ev.lowercase),
            )
            metrics[f"{metric_key_prefix}_cer"] = corpus["cer_raw"]
            metrics[f"{metric_key_prefix}_cer_norm"] = corpus["cer_norm"]
            metrics[f"{metric_key_prefix}_line_acc"] = corpus["line_acc_raw"]
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 3)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class SaveRunConfigCallback(TrainerCallback):
    """Writes the resolved run config into every checkpoint, so ``--ckpt DIR`` needs nothing else."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def on_save(self, args, state, control, **kwargs):
        """Called after the Trainer wrote ``checkpoint-<step>``."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            save_config(self.cfg, ckpt)
        return control


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first (by step, not by name)."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint has everything resume needs; if not, which file is missing."""
    needed = ["adapter_config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt", "run_config.yaml"]
    weights = ["adapter_model.safetensors", "adapter_model.bin"]
    missing = [n for n in needed if not (path / n).is_file()]
    if not any((path / w).is_file() for w in weights):
        missing.append("adapter_model.safetensors")
    return (not missing, ", ".join(missing))


def resolve_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """``null`` -> None; ``latest`` -> newest complete checkpoint (error if none); a path -> checked path."""
    if resume is None:
        return None
    if resume == "latest":
        for ckpt in reversed(list_checkpoints(output_dir)):
            ok, missing = is_complete_checkpoint(ckpt)
            if ok:
                log.info("resume_from_checkpoint=latest -> %s", ckpt)
                return str(ckpt)
            log.warning("skipping incomplete checkpoint %s (missing: %s)", ckpt, missing)
        raise FileNotFoundError(
            f"resume_from_checkpoint=latest but {str(output_dir)!r} holds no complete checkpoint-N folder. "
            "To fix: set resume_from_checkpoint: null to start fresh, or point it at a checkpoint folder."
        )
    ok, missing = is_complete_checkpoint(Path(resume))
    if not ok:
        raise FileNotFoundError(f"resume_from_checkpoint {resume!r} is incomplete (missing: {missing})")
    return resume


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory in GiB (None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
