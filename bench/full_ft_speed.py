"""Full fine-tuning of v1 through ``train/train_lora.py``: no DeepSpeed, ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload.

    python -m bench.full_ft_speed --data DIR --out OUT                # one GPU, full-size random v1 (3.34 B)
    python -m bench.full_ft_speed --data DIR --out OUT --quick        # tiny v1 on CPU (checks the bench itself)

Each run is the user's command under the launcher, one rank: ``torchrun --nproc_per_node 1
train/train_lora.py --config configs/v1_lora_zh.yaml finetune.method=full training.deepspeed=...``, on a
parquet folder from ``python -m data.generate``. A LoRA run of the same shape is the reference row. Per
run: steady samples/s and save times from the run's ``speed.json``, peak GPU memory from
``all_results.json`` (``torch.cuda.max_memory_allocated``), peak host memory (RSS of the whole process tree,
sampled every 0.2 s with psutil), checkpoint size on disk (``du`` of the last ``checkpoint-N``, DeepSpeed
shards included) and wall time. DeepSpeed rows are skipped (with the reason) when it is not installed.

Writes ``OUT/full_ft_speed.json`` and ``OUT/full_ft_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DS = REPO / "configs" / "deepspeed"
FULL = ["finetune.method=full"]

# name, overrides, needs DeepSpeed
SUITE = [
    ("LoRA (reference)", [], False),
    ("full, no DeepSpeed", FULL, False),
    ("full, ZeRO-2", [*FULL, f"training.deepspeed={DS / 'zero2.json'}"], True),
    ("full, ZeRO-3", [*FULL, f"training.deepspeed={DS / 'zero3.json'}"], True),
    ("full, ZeRO-3 + CPU offload", [*FULL, f"training.deepspeed={DS / 'zero3_offload.json'}"], True),
]
# One micro-batch of 8 Gundam lines as the recipe; fused AdamW is not what DeepSpeed runs (it brings its own).
GPU_RUN = ["training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1", "training.optim=adamw_torch",
           "training.gradient_checkpointing=true"]
QUICK_RUN = ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
             "data.max_train_samples=16"]


def log(msg: str) -> None:
    """Timestamped progress line."""
    print(f"[full_ft_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Peak summed RSS and PSS (GiB) of ``pid`` and its children until ``stop``: ``out`` gets ``[rss, pss]``.

    Summed RSS counts the pages forked DataLoader workers share with the rank once per process (an upper
    bound); PSS splits each shared page between the processes mapping it, so its sum is the tree's real share.
    """
    import psutil

    peak_rss = peak_pss = 0.0
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            procs = [p for p in [root, *root.children(recursive=True)] if p.is_running()]
            peak_rss = max(peak_rss, sum(p.memory_info().rss for p in procs) / 2**30)
            peak_pss = max(peak_pss, sum(getattr(p.memory_full_info(), "pss", 0) for p in procs) / 2**30)
        except psutil.Error:
            pass
        stop.wait(0.2)
    out.extend([peak_rss, peak_pss])


def _du_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


# One checkpoint per run, at its last step: a full v1 DeepSpeed checkpoint (weights + fp32 master + AdamW
# moments, ~47 GB) fits a 64 GB disk once, not twice (HF writes the next one before deleting the last).
def run(name: str, overrides: list[str], steps: int, model_dir: Path, data: Path, work: Path, quick: bool,
        keep: bool = False) -> dict:
    """One ``torchrun --nproc_per_node 1 train_lora.py`` run; returns its figures."""
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    config = REPO / "configs" / ("tiny_cpu.yaml" if quick else "v1_lora_zh.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
           str(REPO / "train" / "train_lora.py"), "--config", str(config), f"model.name_or_path={model_dir}",
           f"data.dataset={data}", f"output_dir={out}", f"training.max_steps={steps}", f"training.save_steps={steps}",
           "training.eval_strategy=no", "training.report_to=[]", "training.logging_steps=5",
           "training.save_total_limit=1", *(QUICK_RUN if quick else GPU_RUN), *overrides]
    log(f"{name}: {' '.join(overrides) or '(LoRA as shipped)'}")
    t0 = time.perf_counter()
    with open(work / f"{out.name}.log", "w") as console:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, env=dict(os.environ))
        stop, rss = threading.Event(), []
        watcher = threading.Thread(target=_peak_rss, args=(proc.pid, stop, rss), daemon=True)
        watcher.start()
        rc = proc.wait()
        stop.set()
        watcher.join()
    wall = time.perf_counter() - t0
    # Paths relative to the repo in the results: they are committed, and name no machine's folders.
    shown = [o.replace(f"{REPO}{os.sep}", "") for o in overrides]
    row = {"name": name, "overrides": shown, "wall_s": round(wall, 1), "peak_host_gib": round(rss[0], 2) if rss else None,
           "peak_host_pss_gib": round(rss[1], 2) if rss else None}
    if rc != 0:
        row["error"] = (work / f"{out.name}.log").read_text(errors="replace")[-3000:]
        log(f"  FAILED (rc {rc}), see {work / f'{out.name}.log'}")
        if not keep:  # a failed save leaves tens of GB behind: the next run would fail for want of disk
            shutil.rmtree(out, ignore_errors=True)
        return row
    speed = json.loads((out / "speed.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    row.update(steady_samples_per_s=speed.get("steady_samples_per_s"), save_s=speed.get("save_s"),
               first_step_s=speed.get("first_step_s"), peak_gpu_gib=results.get("peak_gpu_gib"),
               checkpoint_gib=round(_du_gib(ckpts[-1]), 2) if ckpts else None,
               final_gib=round(_du_gib(out / "final"), 2) if (out / "final").is_dir() else None)
    log(f"  {row['steady_samples_per_s']} samples/s, peak GPU {row['peak_gpu_gib']} GiB, host {row['peak_host_gib']} GiB, "
        f"checkpoint {row['checkpoint_gib']} GiB saved in {row['save_s']} s")
    if not keep:  # a full v1 DeepSpeed checkpoint is ~50 GB (weights + AdamW state): the next run needs the disk
        for folder in [*ckpts, out / "final"]:
            shutil.rmtree(folder, ignore_errors=True)
    return row


def render(result: dict) -> str:
    """Markdown table of the runs."""
    lines = [f"Full fine-tuning through train_lora.py, 1 rank, {result['device']} (torch {result['torch']}, "
             f"deepspeed {result['deepspeed'] or 'not installed'})", "",
             "| run | samples/s | peak GPU GiB | peak host GiB (RSS sum) | peak host GiB (PSS sum) | checkpoint GiB | save s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['name']} | {r.get('skipped') or 'failed'} | | | | | | {r.get('wall_s', '')} |")
            continue
        lines.append(f"| {r['name']} | {r['steady_samples_per_s']} | {r['peak_gpu_gib']} | {r['peak_host_gib']} | "
                     f"{r.get('peak_host_pss_gib')} | {r['checkpoint_gib']} | {', '.join(str(s) for s in r['save_s'] or [])} | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write the JSON and Markdown results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="parquet folder from data.generate (a train split)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/full_ft_speed", help="run folders and the model")
    p.add_argument("--model", help="model folder (default: a random full-size v1 made in --work)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 14; quick 6)")
    p.add_argument("--only", nargs="*", help="run names to keep (substring match)")
    p.add_argument("--exact", action="store_true", help="--only names must match whole run names")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU")
    p.add_argument("--keep", action="store_true", help="keep each run's checkpoints (default: deleted once measured)")
    a = p.parse_args(argv)
    import torch

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if a.model:
        model_dir = Path(a.model)
    elif a.quick:
        from dsocr.models.make_tiny import make_tiny

        model_dir = make_tiny("deepseek_ocr_v1", work / "tiny_v1")
    else:
        from dsocr.models.make_tiny import make_full_size_v1

        model_dir = make_full_size_v1(work / "v1_full")
    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.quick else "cpu",
              "torch": torch.__version__, "deepspeed": ds_version, "runs": []}
    steps = a.steps or (6 if a.quick else 14)
    suite = [s for s in SUITE if not a.only or any(o == s[0] or (not a.exact and o in s[0]) for o in a.only)]
    for name, overrides, needs_ds in suite:
        if needs_ds and ds_version is None:
            result["runs"].append({"name": name, "skipped": "deepspeed not installed"})
            continue
        if a.quick:
            overrides = [*overrides, "training.use_cpu=true"]
        result["runs"].append(run(name, overrides, steps, model_dir, Path(a.data).resolve(), work, a.quick, a.keep))
        (out / "full_ft_speed.json").write_text(json.dumps(result, indent=2))
    (out / "full_ft_speed.json").write_text(json.dumps(result, indent=2))
    (out / "full_ft_speed.md").write_text(render(result))
    print(render(result))
    return 1 if any("error" in r for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
