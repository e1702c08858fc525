"""Trainer pieces: exact perplexity + CER at each evaluation, atomic self-describing checkpoints, exact resume.

``OCRTrainer.evaluate`` replaces HF's evaluation loop (which averages per-batch mean losses) with the
exact corpus NLL over target tokens, and adds CER / line accuracy on a small fixed subset of the eval
split, so ``metric_for_best_model: eval_cer`` can pick the best checkpoint by what users care about.

Robustness (dsocr/checkpointing.py has the mechanics), by a public callback and three overridden private
``Trainer`` methods (which is why ``dsocr/versions.py`` holds transformers to the tested version):

* ``_save_checkpoint``: HF writes straight into ``checkpoint-N`` (a kill mid-save leaves a folder that
  looks resumable) and we used to add ``run_config.yaml`` after it, in a callback. Ours writes the same
  files with HF's own writers (``save_model``, ``_save_optimizer_and_scheduler``, ``_save_scaler``,
  ``_save_rng_state``, ``TrainerState.save_to_json``) plus the run config into ``.tmp-checkpoint-N``, fsyncs
  and renames, then rotates without ever deleting the newest complete or the best checkpoint.
* ``_finalize_training``: HF's end-of-training cleanup deletes every checkpoint but the best when
  ``save_total_limit == 1``, the last complete one included; we keep ours (the rotation keeps both).
* ``_load_from_checkpoint``: HF's resume loading with PEFT's v5 key renaming switched off (it would drop
  OCR-2's adapter weights).
* ``_StopAtStepEnd`` (a ``TrainerCallback``): a pending SIGTERM/SIGINT makes HF save the step just
  finished and stop. With several processes the flag is agreed at every step end (``agree_max``: an
  all_reduce(MAX) over a CPU group, no GPU sync) before anyone saves, so a signal that reached one rank
  stops every rank at the same step (alone, that rank would wait in the save barrier forever).
* ``_save_rng_state`` / ``_load_rng_state``: one file per rank (``rng_state_R.pth``) holding this rank's
  own generators only (HF stores every visible GPU's CUDA state in each rank's file and touches them all).
* ``train``: installs the signal handlers for its duration only, and removes leftovers of killed saves.
* ``training_step`` / ``floating_point_ops`` (public): the per-step walks of the module tree (``train()``,
  ``zero_grad()``, ``parameters()``, the FLOP count's ``num_parameters``) done once per run
  (``dsocr/tree_walks.py``: tens of ms per step with LoRA on v1's experts).

Exact resume: HF already restores adapter, optimizer, scheduler and RNG and skips the consumed batches
(saves happen only at optimizer-step boundaries, so the gradient-accumulation position is always 0).
Two holes are closed here: evaluation runs inside ``preserved_rng`` (the eval-before of a fresh run and
the CER generation must not shift the training RNG), and ``data_seed`` is pinned to ``seed`` so the
shuffling order never depends on the global RNG state at the moment ``train()`` builds the dataloader.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from collator.deepseek_ocr import DeepSeekOCRDataCollator
from dsocr.adapters import peft_v5_renaming_off
from dsocr.checkpointing import StopOnSignal, clean_leftovers, pause_for_test, preserved_rng, publish, rotate
from dsocr.checkpoints import LAUNCH_FILE, TMP_PREFIX, rng_state_name
from dsocr.config import RunConfig, save_config
from dsocr.distributed import agree_max, gather_objects, launch_record
from dsocr.generation import (
    GenerationSettings,
    batch_nll_sums,
    generate_batched,
    max_new_tokens_for,
    sum_batches,
)
from dsocr.metrics import NormalizeConfig, perplexity, score_lines
from dsocr.speed import SpeedMeter
from dsocr.mixed_precision import LoraInputCasts
from dsocr.tree_walks import FixedTree

log = logging.getLogger(__name__)
__all__ = ["OCRTrainer"]


class _StopAtStepEnd(TrainerCallback):
    """On a pending SIGTERM/SIGINT, ask the Trainer to save this optimizer step and stop (a public hook).

    ``on_step_end`` runs after the optimizer step and before HF's log/eval/save of that step: the only
    point where the step is finished and no gradient is half-accumulated. Setting ``should_save`` makes
    HF's own save of this step happen (once, also when the schedule saves it anyway), and
    ``should_training_stop`` ends the epoch loop right after.
    """

    def __init__(self, trainer: OCRTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        """Test pause point ``step:N``, then the signal check, agreed over every rank."""
        pause_for_test("step", state.global_step, args.output_dir)
        signals = self.trainer._signals
        received = signals.received if signals is not None and signals.received is not None else 0
        # Every rank, every step, before anyone saves: the largest signal number any rank received (0 =
        # none). Skipping it on the ranks without a signal is what deadlocks: the signalled rank enters
        # the checkpoint barrier while the others enter the next step's gradient all_reduce.
        agreed = agree_max(received)
        if agreed:
            self.trainer._stop_signal = agreed
            control.should_save = True
            control.should_training_stop = True
        return control


class OCRTrainer(Trainer):
    """``Trainer`` with exact perplexity + CER evaluation, atomic checkpoints and a graceful SIGTERM.

    After ``train()`` returns, ``stopped_by`` names the signal that stopped it early (else None) and
    ``last_checkpoint`` the folder of the newest checkpoint this trainer published.
    """

    def __init__(self, *args, run_cfg: RunConfig, cer_records: list | None = None,
                 model_loaded_at: float | None = None, **kwargs):
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None and targs.data_seed is None:
            # The seedable sampler otherwise takes torch.initial_seed() when train() builds the dataloader:
            # right today, silently wrong once anything re-seeds in between. Must precede super(), which
            # hands data_seed to the accelerator.
            targs.data_seed = targs.seed
        super().__init__(*args, **kwargs)
        self.add_callback(_StopAtStepEnd(self))
        a = self.args
        self.speed = SpeedMeter(a.per_device_train_batch_size * a.gradient_accumulation_steps * max(a.world_size, 1),
                                model_loaded_at=model_loaded_at)
        self.add_callback(self.speed)  # after the stop flag: it sees the step's final should_save
        self.run_cfg = run_cfg
        self.cer_records = cer_records or []
        self.stopped_by: str | None = None
        self.last_checkpoint: str | None = None
        self._signals: StopOnSignal | None = None
        self._stop_signal = 0  # the signal number agreed over all ranks at a step end (0 = none)
        self._walks: ExitStack | None = None  # holds the FixedTree of the model being stepped, in train()
        self._fixed_tree: FixedTree | None = None
        self._lora_casts: LoraInputCasts | None = None  # PEFT's LoRA input casts, off inside a training step
        self._flop_params: int | None = None

    # ---------------------------------------------------------------- train: signals and leftovers

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train`` with SIGTERM/SIGINT handled (save at the step end, stop) and stale temporaries removed."""
        if self.args.should_save:
            clean_leftovers(self.args.output_dir)
        self.stopped_by = None
        self._stop_signal = 0
        try:
            with StopOnSignal() as self._signals, ExitStack() as self._walks:
                out = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            if self._stop_signal and self.state.global_step < self.state.max_steps:
                # A signal at the last step changes nothing. The agreed number, not this rank's own: a rank
                # that saw no signal stopped too and must exit 75 like the one that did.
                self.stopped_by = signal.Signals(self._stop_signal).name
        finally:
            self._signals, self._walks, self._fixed_tree, self._lora_casts = None, None, None, None
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        """HF's step; the first one fixes the stepped model's tree walks for the rest of ``train()``.

        Not under DeepSpeed (its engine brings its own ``train``/``zero_grad``). Taken at the first step,
        not in ``train()``: the model stepped is the one HF has wrapped (DDP) by then.
        """
        if self._fixed_tree is None and self._walks is not None and not self.is_deepspeed_enabled:
            self._fixed_tree = self._walks.enter_context(FixedTree(model))
            # Under autocast (accelerate wraps the forward when native_amp) PEFT's cast of every LoRA input to
            # the float32 adapter dtype is an exact round trip: off for the step (dsocr/mixed_precision.py).
            if getattr(self.accelerator, "native_amp", False):
                self._lora_casts = LoraInputCasts(model)
        if self._lora_casts is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with self._lora_casts:
            return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        """HF's estimate (6 x input tokens x non-embedding parameters), the parameter count taken once.

        HF counts the parameters for every micro-batch: two walks of the module tree each time.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_params

    # ---------------------------------------------------------------- atomic checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """HF's resume loading, minus peft's v5 key renaming that would drop OCR-2's adapter weights."""
        with peft_v5_renaming_off():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` atomically: everything (run config included) into a temporary, then rename.

        Same content and order as HF's ``_save_checkpoint``, built from its own writers; the differences
        are the temporary folder, fsync + rename, the run config inside, and our rotation (``rotate``).
        """
        step = self.state.global_step
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"checkpoint-{step}"
        tmp = run_dir / f"{TMP_PREFIX}{final.name}"
        self.accelerator.wait_for_everyone()  # every rank writes into the same temporary
        if self.args.should_save and tmp.exists():
            shutil.rmtree(tmp)  # a save of this step that died earlier in this very process tree
        self.accelerator.wait_for_everyone()
        self.save_model(str(tmp), _internal_call=True)
        pause_for_test("save", step, run_dir)  # test hook: SIGKILL here = a kill mid-save
        # Best checkpoint: HF checks that the folder exists after writing the model; ours appears only at
        # the rename, so the current step counts as existing.
        best_step = self.state.best_global_step
        if best_step and (best_step == step or (run_dir / f"checkpoint-{best_step}").is_dir()):
            self.state.best_model_checkpoint = str(run_dir / f"checkpoint-{best_step}")
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        if self.args.should_save:
            # Stateful callbacks (e.g. early stopping) resume with their counters, as in HF.
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(tmp / "trainer_state.json"))
            save_config(self.run_cfg, tmp)  # self-describing: eval_cer.py --ckpt needs nothing else
            # World size, global batch, ZeRO stage: what a resume on another launch is checked against.
            (tmp / LAUNCH_FILE).write_text(json.dumps(launch_record(self.args)), encoding="utf-8")
        self.accelerator.wait_for_everyone()  # all ranks' RNG files are in before the rename
        if self.args.should_save:
            publish(tmp, final)
            self.last_checkpoint = str(final)
            log.info("saved %s", final)
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
            rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
            pause_for_test("saved", step, run_dir)  # test hook: SIGKILL here = a kill right after a save
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        """HF's loading, except on a multi-process CPU run (optimizer state mapped to the CPU).

        HF maps the state to ``args.device``, which is ``cpu:0`` there: torch cannot restore tensors to it.
        """
        if (checkpoint is None or self.is_deepspeed_enabled or self.args.world_size <= 1
                or self.args.device.type != "cpu"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer, scheduler = os.path.join(checkpoint, "optimizer.pt"), os.path.join(checkpoint, "scheduler.pt")
        if os.path.isfile(optimizer) and os.path.isfile(scheduler):
            self.optimizer.load_state_dict(torch.load(optimizer, map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        return None

    def _save_rng_state(self, output_dir: str) -> None:
        """This rank's generators only (python, numpy, torch CPU, this rank's own CUDA device)."""
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if self.args.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.args.device)
        os.makedirs(output_dir, exist_ok=True)  # a rank may get here before rank 0 made the folder
        torch.save(states, os.path.join(output_dir, rng_state_name(self.args.process_index, self.args.world_size)))

    def _load_rng_state(self, checkpoint) -> None:
        """Restore this rank's generators from its own file (``plan_resume`` checked the world size)."""
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, rng_state_name(self.args.process_index, self.args.world_size))
        if not os.path.isfile(path):
            log.warning("no RNG state %s for rank %d: dropout & co. continue from a fresh RNG state (the run "
                        "is not bit-for-bit the uninterrupted one)", path, self.args.process_index)
            return
        with _numpy_globals():
            states = torch.load(path, weights_only=True)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if self.args.device.type == "cuda" and "cuda" in states:
            cuda = states["cuda"]
            if cuda.dim() == 2:  # HF's layout (every visible device): this rank's own row
                cuda = cuda[self.args.device.index or 0]
            torch.cuda.set_rng_state(cuda, self.args.device)

    def _finalize_training(self, trial, num_train_samples, start_time):
        """HF's end of training, minus its ``save_total_limit == 1`` sweep that deletes the last checkpoint."""
        limit = self.args.save_total_limit
        if limit == 1 and self.state.best_model_checkpoint is not None:
            self.args.save_total_limit = 2  # skips the sweep; ``rotate`` already kept exactly best + newest
        try:
            return super()._finalize_training(trial, num_train_samples, start_time)
        finally:
            self.args.save_total_limit = limit

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Exact eval loss/perplexity over all target tokens, plus CER on ``cer_records``.

        Runs inside ``preserved_rng``: evaluating (or not) never changes what training draws afterwards.
        """
        with preserved_rng():
            return self._evaluate_exact(eval_dataset, metric_key_prefix)

    def _evaluate_exact(self, eval_dataset, metric_key_prefix: str) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        collator: DeepSeekOCRDataCollator = self.data_collator
        device = self.args.device
        start = time.perf_counter()
        # Decoded once per dataset and kept: every eval_steps re-scores the same lines (images are small).
        if getattr(self, "_eval_cache_key", None) is not dataset:
            self._eval_cache_key, self._eval_records = dataset, [dataset[i] for i in range(len(dataset))]
        records = self._eval_records
        shard = self._eval_shard()
        # Each rank scores its share of the batches; the merged per-batch sums, added in batch order, are
        # the single-process total bit for bit (same batches, same order of addition).
        merged: dict = {}
        for part in gather_objects(batch_nll_sums(self.model, collator, records, self.args.per_device_eval_batch_size,
                                                  device, shard=shard)):
            merged.update(part)
        total, tokens = sum_batches(merged)
        metrics = {
            f"{metric_key_prefix}_loss": total / max(tokens, 1),
            f"{metric_key_prefix}_perplexity": perplexity(total, tokens),
            f"{metric_key_prefix}_target_tokens": tokens,
        }
        if self.cer_records:
            ev = self.run_cfg.eval
            settings = GenerationSettings(
                batch_size=ev.batch_size,
                max_new_tokens=max_new_tokens_for(
                    collator.tokenizer, [r["messages"][1]["content"] for r in self.cer_records if r], ev.max_new_tokens
                ),
                no_repeat_ngram_size=ev.no_repeat_ngram_size,
            )
            preds = generate_batched(self.model, collator, self.cer_records, settings, device, progress=False,
                                     shard=shard)
            for part in gather_objects(preds):  # every rank: its batches filled in, the others None
                preds = [p if p is not None else q for p, q in zip(preds, part)]
            corpus, _ = score_lines(
                [p["reference"] for p in preds], [p["hypothesis"] for p in preds],
                prompt_phrases=(self.run_cfg.collator.instruction,), normalize_cfg=NormalizeConfig(nfkc=ev.nfkc, remove_whitespace=ev.remove_whitespace,
                                              lowercase=ev.lowercase),
            )
            metrics[f"{metric_key_prefix}_cer"] = corpus["cer_raw"]
            metrics[f"{metric_key_prefix}_cer_norm"] = corpus["cer_norm"]
            metrics[f"{metric_key_prefix}_line_acc"] = corpus["line_acc_raw"]
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 3)
        # Full precision in train.log (the console's progress line rounds to 4 digits).
        log.info("evaluation %s over %d rank(s): %s", metric_key_prefix, shard[1], json.dumps(metrics))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_shard(self) -> tuple[int, int]:
        """``(rank, world)`` of this process's share of the evaluation batches.

        Under ZeRO-3 every forward gathers the partitioned weights collectively, so every rank must run
        every batch in lockstep: each evaluates all of it, ``(0, 1)``. Otherwise (DDP, ZeRO-1/2: full
        weights on every rank) the batches are split over the ranks and the results gathered.
        """
        world = max(self.args.world_size, 1)
        if world > 1 and self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return (0, 1)
        return (self.args.process_index, world)


def _numpy_globals():
    """``torch.load(weights_only=True)`` of a numpy RNG state needs its types allow-listed (HF's helper)."""
    from transformers.trainer_pt_utils import safe_globals

    return safe_globals()
