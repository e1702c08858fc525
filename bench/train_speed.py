"""Speed through the commands users run: ``train/train_lora.py`` and ``eval/eval_cer.py``, not a side loop.

    python -m bench.train_speed --data DIR --out OUT                          # one CUDA device, full-size v1
    python -m bench.train_speed --data DIR --out OUT --baseline-tree OLD      # + the same runs of older code
    python -m bench.train_speed --data DIR --out OUT --quick                  # tiny v1 on CPU (debugging)

Each run is a subprocess of the user's command on the shipped ``configs/v1_lora_zh.yaml`` with ``key=value``
overrides: the dataset is a parquet folder written by ``python -m data.generate`` (carried to the GPU
machine), the collator runs in DataLoader workers, ``OCRTrainer`` trains and saves checkpoints. The figures
come from the run's own ``speed.json`` (``dsocr/speed.py``: steady samples/s of the steps after warm-up,
saves excluded, time to the first step, save times, and the synchronised per-phase breakdown of a few
profiled steps) and ``all_results.json`` (peak GPU memory). MFU = steady samples/s x model FLOPs per sample
(computed from the same data through the real collator, ``bench.benchmark``'s FLOP counts) / a bf16 8192^3
matmul measured in the same call.

With ``--baseline-tree OLD`` (a checkout of older code), the same runs of that code are made in the same call
on the same data and model, so every speed-up is a ratio from one run on one card. Older code writes no
``speed.json``: a ``sitecustomize`` hook (``bench/baseline_hook/``) adds the same host-clock
``SpeedMeter`` callback to its Trainer without changing anything else it does.

``eval/eval_cer.py`` is timed on the test split (512 lines) at a large batch with a fixed number of new
tokens; its ``metrics.json`` has ``lines_per_s``.

Writes ``OUT/train_speed.json`` and ``OUT/train_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "baseline_hook"


def log(msg: str) -> None:
    """Timestamped progress line."""
    print(f"[train_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# name, overrides (on configs/v1_lora_zh.yaml), profiled steps "A:B" or None
FAST_LOADER = ["training.dataloader_num_workers=8"]
SUITE_GPU = [
    # The shipped config unchanged: 8 x 1 now; an older tree runs its own shipped layout (2 x 4 before 6be396a).
    ("shipped v1_lora_zh.yaml as is", [], 16, "13:15"),
    # The "cuDNN attention off" rows set model.cudnn_attention=false explicitly: the default now, and
    # what the README's rows measured; the plain rows take the tree's own default (on in older trees).
    ("shipped, cuDNN attention off", ["model.cudnn_attention=false"], 16, None),
    ("Gundam 2 x 4", ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=4"], 14, None),
    ("Gundam 64 x 1", ["training.per_device_train_batch_size=64", "training.gradient_accumulation_steps=1",
                       *FAST_LOADER], 14, "11:13"),
    ("Gundam 64 x 1, cuDNN attention off", ["training.per_device_train_batch_size=64",
                                            "training.gradient_accumulation_steps=1", *FAST_LOADER,
                                            "model.cudnn_attention=false"], 14, None),
    ("Gundam 128 x 1, cuDNN attention off", ["training.per_device_train_batch_size=128",
                                             "training.gradient_accumulation_steps=1", *FAST_LOADER,
                                             "model.cudnn_attention=false"], 14, None),
    ("Tiny 128 x 1", ["training.per_device_train_batch_size=128", "training.gradient_accumulation_steps=1",
                      "collator.image_mode=tiny", *FAST_LOADER], 14, "11:13"),
    ("Tiny 128 x 1, cuDNN attention off", ["training.per_device_train_batch_size=128",
                                           "training.gradient_accumulation_steps=1", "collator.image_mode=tiny",
                                           *FAST_LOADER, "model.cudnn_attention=false"], 14, None),
]
SUITE_QUICK = [
    ("tiny model 2 x 4", ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=4"], 8, None),
    ("tiny model 8 x 1", ["training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1"], 8, "7:9"),
]


def matmul_tflops(quick: bool) -> float | None:
    """bf16 8192^3 matmul rate of this card (None on CPU)."""
    import torch

    if quick or not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 / ((time.perf_counter() - t0) / 20) / 1e12


def flops_per_sample(model_dir: Path, data: Path, mode: str, n: int = 128) -> float:
    """Mean model FLOPs of one training sample of ``data`` in image ``mode`` (vision fwd + LM 3x fwd)."""
    from bench.benchmark import v1_batch_flops
    from dsocr.config import load_config
    from dsocr.datasets import load_conversations
    from dsocr.models import get_family

    cfg = load_config(REPO / "configs" / "v1_lora_zh.yaml", [f"model.name_or_path={model_dir}", f"data.dataset={data}",
                                                            f"collator.image_mode={mode}"])
    family = get_family("deepseek_ocr_v1")
    from collator.deepseek_ocr import DeepSeekOCRDataCollator
    from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig

    config = DeepseekOCRConfig.from_pretrained(model_dir)

    class _Shapes:  # what the family reads from a model: its config
        pass

    shapes = _Shapes()
    shapes.config = config
    collator = DeepSeekOCRDataCollator(tokenizer=family.load_tokenizer(str(model_dir)), family=family,
                                       image_processor=family.image_processor(shapes, mode),
                                       image_token_id=family.image_token_id(shapes), train=True)
    ds = load_conversations(cfg, "train", n)
    n = len(ds)
    total = 0.0
    for start in range(0, n, 16):
        total += v1_batch_flops(config, collator([ds[i] for i in range(start, min(n, start + 16))]))
    return total / n


def run_train(tree: Path, name: str, overrides: list[str], steps: int, profile: str | None, model_dir: Path,
              data: Path, work: Path, quick: bool, baseline: bool) -> dict:
    """One ``train_lora.py`` run of ``tree``; returns its speed.json + peak memory."""
    out = work / (("old-" if baseline else "new-") + "".join(c if c.isalnum() else "_" for c in name))
    config = tree / "configs" / ("tiny_cpu.yaml" if quick else "v1_lora_zh.yaml")
    args = [sys.executable, str(tree / "train" / "train_lora.py"), "--config", str(config),
            f"model.name_or_path={model_dir}", f"data.dataset={data}", f"output_dir={out}",
            f"training.max_steps={steps}", f"training.save_steps={steps - 4}", "training.eval_strategy=no",
            "training.report_to=[]", "training.logging_steps=5", "training.save_total_limit=2", *overrides]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *([str(HOOK)] if baseline else []), env.get("PYTHONPATH", "")])
    env["DSOCR_BENCH_SPEED_SRC"] = str(REPO)  # where the hook finds SpeedMeter
    env.pop("DSOCR_PROFILE_STEPS", None)
    if profile:
        env["DSOCR_PROFILE_STEPS"] = profile
    log(f"{'old' if baseline else 'new'} | {name}: {' '.join(overrides) or '(as shipped)'}")
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - t0
    (work / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        log(f"  FAILED (rc {proc.returncode}): {proc.stderr[-1500:]}")
        return {"name": name, "code": "old" if baseline else "new", "error": proc.stderr[-3000:], "wall_s": wall}
    speed = json.loads((out / "speed.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    row = {"name": name, "code": "old" if baseline else "new", "overrides": overrides, "wall_s": round(wall, 1),
           **speed, "peak_gpu_gib": results.get("peak_gpu_gib")}
    if (out / "profile_ops.txt").is_file():
        row["profile_ops"] = (out / "profile_ops.txt").read_text()[:30000]
    log(f"  {row.get('steady_samples_per_s')} samples/s, first step {row.get('first_step_s')} s, "
        f"peak {row.get('peak_gpu_gib')} GiB, breakdown {row.get('breakdown_ms')}")
    return row


def run_eval(tree: Path, model_dir: Path, data: Path, work: Path, quick: bool, baseline: bool, lines: int) -> dict:
    """``eval_cer.py`` on ``lines`` test lines at batch 128 (16 new tokens); its lines/s."""
    out = work / ("old-eval" if baseline else "new-eval")
    config = tree / "configs" / ("tiny_cpu.yaml" if quick else "v1_lora_zh.yaml")
    args = [sys.executable, str(tree / "eval" / "eval_cer.py"), "--ckpt", str(model_dir), "--config", str(config),
            "--out", str(out), f"data.dataset={data}", "eval.split=test", f"eval.max_samples={lines}",
            f"eval.batch_size={16 if quick else 128}", "eval.max_new_tokens=16"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    log(f"{'old' if baseline else 'new'} | eval_cer {lines} lines")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tree)
    (work / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"code": "old" if baseline else "new", "error": proc.stderr[-3000:]}
    m = json.loads((out / "metrics.json").read_text())
    row = {"code": "old" if baseline else "new", "lines": m["n_lines"], "lines_per_s": round(m["lines_per_s"], 2),
           "seconds": m["seconds"], "batch_size": m["batch_size"], "max_new_tokens": m["max_new_tokens"],
           "image_mode": m["image_mode"]}
    log(f"  {row['lines_per_s']} lines/s")
    return row


def render(result: dict) -> str:
    """Markdown tables of the runs (ratios against the old code's same run)."""
    lines = [f"# Speed through train_lora.py / eval_cer.py on {result['device']}", "",
             f"bf16 matmul {result.get('matmul_tflops') or 0:.1f} TFLOP/s (same call); torch {result['torch']}.", "",
             "| code | run | steady samples/s | x old | first step s | model loaded -> first step s | save s | "
             "peak GiB | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    old = {r["name"]: r for r in result["train"] if r["code"] == "old" and "error" not in r}
    for r in result["train"]:
        if "error" in r:
            lines.append(f"| {r['code']} | {r['name']} | failed | | | | | | |")
            continue
        base = old.get(r["name"])
        ratio = f"{r['steady_samples_per_s'] / base['steady_samples_per_s']:.2f}" if base and r["code"] == "new" and \
            base.get("steady_samples_per_s") and r.get("steady_samples_per_s") else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        saves = ", ".join(f"{s:.1f}" for s in r.get("save_s", []))
        lines.append(f"| {r['code']} | {r['name']} | {r.get('steady_samples_per_s')} | {ratio} | {r.get('first_step_s')} | "
                     f"{r.get('model_loaded_to_first_step_s')} | {saves} | {r.get('peak_gpu_gib')} | {mfu} |")
    lines += ["", "Per-step breakdown (ms, synchronised profiled steps):", "",
              "| code | run | between steps | to device | forward | backward | optimizer | after optimizer |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        b = r.get("breakdown_ms")
        if b:
            lines.append(f"| {r['code']} | {r['name']} | " + " | ".join(str(b.get(k, "")) for k in (
                "between_steps", "to_device", "forward", "backward", "optimizer", "after_optimizer")) + " |")
    lines += ["", "| code | eval_cer | lines/s | batch | new tokens |", "|---|---|---|---|---|"]
    for e in result["eval"]:
        if "error" in e:
            lines.append(f"| {e['code']} | failed | | | |")
        else:
            lines.append(f"| {e['code']} | {e['lines']} lines, {e['image_mode']} | {e['lines_per_s']} | {e['batch_size']} | "
                         f"{e['max_new_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="parquet folder from data.generate (train + test splits)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/train_speed", help="run folders and the model")
    p.add_argument("--model", help="model folder (default: a random full-size v1 made in --work)")
    p.add_argument("--baseline-tree", help="a checkout of older code to run the same suite with")
    p.add_argument("--only", nargs="*", help="run names to keep (substring match)")
    p.add_argument("--baseline-only", nargs="*", help="runs of --baseline-tree to make (substring match; default all)")
    p.add_argument("--eval-lines", type=int, default=512)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU")
    a = p.parse_args(argv)
    import torch

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data).resolve()
    if a.model:
        model_dir = Path(a.model)
    elif a.quick:
        from dsocr.models.make_tiny import make_tiny

        model_dir = make_tiny("deepseek_ocr_v1", work / "tiny_v1")
    else:
        from dsocr.models.make_tiny import make_full_size_v1

        t0 = time.perf_counter()
        model_dir = make_full_size_v1(work / "v1_full")
        log(f"full-size random v1 in {model_dir} ({time.perf_counter() - t0:.0f} s)")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.quick else "cpu",
              "torch": torch.__version__, "matmul_tflops": matmul_tflops(a.quick), "train": [], "eval": []}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    suite = SUITE_QUICK if a.quick else SUITE_GPU
    if a.only:
        suite = [s for s in suite if any(o in s[0] for o in a.only)]
    modes = {"Tiny": "tiny"}
    fps = {}
    trees = [(Path(a.baseline_tree).resolve(), True)] if a.baseline_tree else []
    trees.append((REPO, False))
    for name, overrides, steps, profile in suite:
        mode = next((v for k, v in modes.items() if name.startswith(k)), "tiny" if a.quick else "gundam")
        if mode not in fps:
            fps[mode] = flops_per_sample(model_dir, data, mode)
        for tree, baseline in trees:
            if baseline and a.baseline_only is not None and not any(o in name for o in a.baseline_only):
                continue
            row = run_train(tree, name, overrides, steps, None if baseline else profile, model_dir, data, work,
                            a.quick, baseline)
            if result["matmul_tflops"] and row.get("steady_samples_per_s"):
                row["mfu"] = row["steady_samples_per_s"] * fps[mode] / (result["matmul_tflops"] * 1e12)
            row["flops_per_sample"] = fps[mode]
            result["train"].append(row)
            (out / "train_speed.json").write_text(json.dumps(result, indent=2))
    if not a.no_eval:
        for tree, baseline in trees:
            result["eval"].append(run_eval(tree, model_dir, data, work, a.quick, baseline, a.eval_lines))
    (out / "train_speed.json").write_text(json.dumps(result, indent=2))
    (out / "train_speed.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
