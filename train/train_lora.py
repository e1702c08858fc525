"""LoRA fine-tuning of DeepSeek-OCR (v1 native, or OCR-2) on text-line images.

    python train/train_lora.py --config configs/v1_lora_zh.yaml                      # the seed recipe
    python train/train_lora.py --config configs/tiny_cpu.yaml training.max_steps=20  # CPU demo
    python train/train_lora.py --config configs/v1_lora_zh.yaml resume_from_checkpoint=latest
    python train/train_lora.py --config configs/v1_lora_zh.yaml resume_from_checkpoint=auto   # requeued jobs

SIGTERM/SIGINT (e.g. a preempted job) saves a checkpoint at the end of the current optimizer step and
exits with code 75 (resume with ``resume_from_checkpoint=latest``); a second signal exits at once.
Checkpoints are written atomically, so a kill at any moment leaves the previous one usable. Resuming a run
that already reached ``max_steps`` trains nothing and leaves ``final/`` as it is.

Several processes (one per GPU; HF Trainer runs DDP, or DeepSpeed with ``training.deepspeed``), the same
command under a launcher:

    torchrun --nproc_per_node 8 train/train_lora.py --config configs/v1_lora_zh.yaml
    accelerate launch --num_processes 8 train/train_lora.py --config configs/v1_lora_zh.yaml

Rank 0 writes the log file, run config, metrics and TensorBoard; the other ranks print warnings only. A
SIGTERM to any rank stops every rank at the same step (all save it, all exit 75).

The YAML fully describes the run (dsocr/config.py documents every key); ``key=value`` refines it.
The resolved config is saved in the run folder and in every checkpoint, so
``python eval/eval_cer.py --ckpt runs/x/checkpoint-500`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from dsocr.config import RunConfig, parse_cli, save_config, training_arguments

log = logging.getLogger("train_lora")


def setup_logging(output_dir: Path, rank: int = 0) -> None:
    """One line per event on the console and the same in ``output_dir/train.log`` (rank 0).

    Other ranks of a multi-process run log warnings and errors only, to the console, tagged with their
    rank: N copies of every line would bury the one that matters.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(output_dir / "train.log", encoding="utf-8")]
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers, force=True)
    else:
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
                            handlers=[logging.StreamHandler(sys.stdout)], force=True)


def check_mixed_precision(cfg: RunConfig, args, model) -> None:
    """A half-precision model trains only under autocast (``training.bf16``/``fp16``); say which flag to set.

    The config check covers an explicit ``model.dtype``; this one the resolved ``auto`` (bf16 on a GPU).
    """
    import torch

    from dsocr.config import ConfigError, trained_parts
    from dsocr.devices import model_dtype

    dtype = model_dtype(model)
    if dtype == torch.bfloat16 and trained_parts(cfg) and not args.bf16:
        raise ConfigError(f"model.dtype {cfg.model.dtype} loaded the model in bfloat16 and finetune trains "
                          f"{', '.join(trained_parts(cfg))} in full: set training.bf16=true (float32 master weights "
                          "under bf16 autocast), or model.dtype=float32")
    if dtype == torch.float16 and not args.fp16:
        raise ConfigError("the model is in float16: set training.fp16=true (autocast + loss scaling)")


def main(cfg: RunConfig) -> dict:
    """Run one fine-tuning job described by ``cfg``; returns the final metrics."""
    # Heavy imports (torch, transformers, datasets) only after the config parsed: a typo fails at once.
    from transformers import set_seed

    from dsocr.adapters import prepare_training
    from dsocr.checkpointing import finish_from_checkpoint
    from dsocr.checkpoints import plan_resume
    from dsocr.datasets import SKIPPED_LOG, build_train_eval, skipped_counts
    from dsocr.devices import peak_memory_gib
    from dsocr.distributed import barrier, launch_record
    from dsocr.loading import load_base
    from dsocr.trainer import OCRTrainer

    # ---------------------------------------------------------------- config, run folder, resume plan
    args = training_arguments(cfg)  # before any model loads: a bad training.* key fails in seconds
    output_dir = Path(cfg.output_dir)
    main_rank = args.process_index == 0  # (also sets up the process group of a multi-process launch)
    setup_logging(output_dir, args.process_index)
    launch = launch_record(args)
    # Another world size than the checkpoint's: allowed with the same global batch (and a note), else an error.
    plan = plan_resume(cfg.resume_from_checkpoint, output_dir, args.max_steps, launch=launch)
    log.info("run folder %s; %s", output_dir, plan.reason)
    if plan.finished:
        # A requeued job of a run that already ended: train nothing, keep final/ as it is.
        result = finish_from_checkpoint(plan.checkpoint, output_dir, cfg) if main_rank else {}
        barrier()
        return result
    if main_rank:
        save_config(cfg, output_dir)

    # ---------------------------------------------------------------- data (before the model: fail fast)
    # Opening the splits reads only metadata; a wrong path, split or column fails here, not after the
    # 3B model has loaded.
    train_ds, eval_ds = build_train_eval(cfg, output_dir)

    # ---------------------------------------------------------------- model + LoRA (or full fine-tuning)
    # Seed before the LoRA A matrices are drawn (the Trainer seeds only later, in its __init__): without
    # it two fresh runs of one config start from different adapters and can never match bit for bit.
    set_seed(cfg.seed)
    loaded = load_base(cfg, args.device)
    family = loaded.family
    check_mixed_precision(cfg, args, loaded.model)
    # finetune.method: lora = PEFT adapter (+ parts in full beside it), full = the parts themselves; either
    # way the trained weights are float32 master copies.
    trainable = prepare_training(loaded)
    model = loaded.model
    if launch["deepspeed"] == 3:
        from dsocr.distributed import mark_moe_leaves

        # Ranks whose tokens skip an expert would otherwise never join that expert's weight gather.
        log.info("ZeRO-3: MoE blocks gathered whole (leaf modules): %s", ", ".join(mark_moe_leaves(model)) or "none")
    model_loaded_at = time.perf_counter()
    if args.gradient_checkpointing:
        # Frozen embeddings give the checkpointed blocks inputs without grad; PEFT's hook fixes that.
        model.enable_input_require_grads()
    model.config.use_cache = False  # the cache is useless (and costs memory) when training

    # ---------------------------------------------------------------- collator and derived sizes
    image_mode = loaded.image_mode
    collator = loaded.make_collator(train=True)
    n_cer = min(cfg.eval.train_cer_samples, len(eval_ds))
    cer_records = [eval_ds[i] for i in range(n_cer)]  # fixed: the first rows of the eval split
    world = launch["world_size"]
    effective_batch = launch["global_batch"]
    example = train_ds[0]
    slots = collator.encode_record(example)["image"].num_image_tokens if example else "?"
    log.info("family %s, image mode %s: %s image tokens for the first training line", family.name, image_mode, slots)
    log.info("train %d lines, eval %d lines (CER on the first %d); effective batch %d = %d x %d accum x %d devices; "
             "%.1f optimizer steps per epoch; trainable parameters %s",
             len(train_ds), len(eval_ds), n_cer, effective_batch, args.per_device_train_batch_size,
             args.gradient_accumulation_steps, world, len(train_ds) / effective_batch, f"{trainable:,}")

    # ---------------------------------------------------------------- trainer
    trainer = OCRTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        run_cfg=cfg, cer_records=cer_records,  # the trainer writes run_config.yaml into every checkpoint
        model_loaded_at=model_loaded_at,
    )
    before = None
    if launch["deepspeed"] == 3 and plan.checkpoint is None and args.eval_strategy != "no":
        # The ZeRO-3 engine (which gathers the partitioned weights) only exists once train() starts.
        log.info("ZeRO-3: no evaluation before training (the weights are partitioned until train() starts)")
    elif plan.checkpoint is None and args.eval_strategy != "no":
        # The base model's starting point; RNG-neutral, so it cannot make fresh and resumed runs differ.
        before = trainer.evaluate(metric_key_prefix="eval_before")
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    elapsed = time.perf_counter() - start
    if trainer.stopped_by:  # SIGTERM/SIGINT: the step's checkpoint is saved; no final/ for a partial run
        log.warning("stopped by %s at step %d; saved %s. To resume: the same command with "
                    "resume_from_checkpoint=latest", trainer.stopped_by, trainer.state.global_step,
                    trainer.last_checkpoint)
        return {"interrupted_by": trainer.stopped_by, "global_step": trainer.state.global_step,
                "checkpoint": trainer.last_checkpoint}

    # ---------------------------------------------------------------- save and report
    final_dir = output_dir / "final"
    trainer.save_model(str(final_dir))  # every rank (ZeRO-3 gathers the weights collectively); rank 0 writes
    if main_rank:
        save_config(cfg, final_dir)
    metrics = dict(train_result.metrics)
    metrics["train_wall_s"] = round(elapsed, 2)
    # HF's train_samples_per_second counts a resumed run's skipped steps too; these are the steps run here.
    speed = trainer.speed.report()
    metrics.update({f"speed_{k}": v for k, v in speed.items() if k in (
        "steps_run", "samples_run", "steady_samples_per_s", "first_step_s", "model_loaded_to_first_step_s")})
    # Counted from the log, which every DataLoader worker of every rank appends to; distinct records per
    # split, once every rank is done writing.
    barrier()
    skipped = skipped_counts(output_dir)
    metrics["skipped_records"] = skipped.get(cfg.data.train_split, 0)
    metrics["skipped_eval_records"] = skipped.get(cfg.data.eval_split, 0)
    if (peak := peak_memory_gib(args.device)) is not None:
        metrics["peak_gpu_gib"] = round(peak, 2)
    if args.eval_strategy != "no":
        after = trainer.evaluate(metric_key_prefix="eval")
        metrics.update(after)
        if before:
            metrics.update(before)
            log.info("CER before %.4f -> after %.4f; perplexity %.3f -> %.3f",
                     before.get("eval_before_cer", float("nan")), after.get("eval_cer", float("nan")),
                     before["eval_before_perplexity"], after["eval_perplexity"])
    if trainer.state.best_model_checkpoint:
        metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    trainer.save_metrics("all", metrics)
    if skipped:
        log.warning("bad records skipped: %s; see %s", skipped, output_dir / SKIPPED_LOG)
    log.info("final adapter in %s; metrics %s", final_dir, json.dumps(metrics, default=str))
    return metrics


if __name__ == "__main__":
    run_cfg = parse_cli()  # a bad key or value exits here, before torch or datasets are imported

    from data.images import BadRecordError
    from data.loader import DataSourceError
    from dsocr.checkpointing import EXIT_INTERRUPTED
    from dsocr.checkpoints import CheckpointError
    from dsocr.config import ConfigError

    try:
        result = main(run_cfg)
    except (ConfigError, CheckpointError, DataSourceError, BadRecordError) as e:  # a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    sys.exit(EXIT_INTERRUPTED if "interrupted_by" in result else 0)
