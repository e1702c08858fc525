r"""The demo's closing summary: before -> after on the test split, three example lines, fonts, environment.

    python eval/summary.py --compare runs/tiny_cpu/compare --run runs/tiny_cpu --data runs/demo_data

Reads only files the earlier steps wrote, so it runs in a second and can be re-run at any time:

* ``<compare>/<base>/metrics.json`` and ``<compare>/<finetuned>/metrics.json`` (``eval_cer.py`` with two
  ``--ckpt``), and their ``predictions.jsonl`` for the example lines;
* ``<run>/all_results.json`` (``train_lora.py``): CER on the eval subset before and after training;
* ``<data>/generation.json`` (``data.generate``): the font files (name + sha256) and renderer versions.

Prints a short report and writes the same figures to ``<compare>/summary.json`` (what the README's demo
table is filled from). The environment block records what makes figures differ between machines: the
font files, Pillow/FreeType, torch and its thread count (read in this process, which runs under the same
environment variables as the training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

N_EXAMPLES = 3


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist. To fix: run the step that writes it first (see `make demo`)")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist. To fix: run eval/eval_cer.py with two --ckpt first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def environment() -> dict:
    """Torch version and threads, CPU, Python: the part of the environment the figures depend on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux: platform's answer is all there is
        pass
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def collect(compare: Path, run: Path | None, data: Path | None, base: str, finetuned: str) -> dict:
    """Gather the figures of one demo run from its files.

    Args:
        compare: ``eval_cer.py``'s output folder (one sub-folder per model, ``report.md``).
        run: The training run folder (``all_results.json``), or None to leave in-training CER out.
        data: The dataset folder (``generation.json``), or None to leave the fonts out.
        base: Sub-folder name of the base model's evaluation.
        finetuned: Sub-folder name of the fine-tuned model's evaluation.

    Returns:
        A JSON-ready dict: ``test`` (per model CER, line accuracy, NED, lines), ``examples``,
        ``in_training``, ``fonts``, ``renderer``, ``environment``, ``report``.
    """
    test, preds = {}, {}
    for name in (base, finetuned):
        m = _read_json(compare / name / "metrics.json")
        test[name] = {"cer": m["cer_raw"], "cer_norm": m["cer_norm"], "line_acc": m["line_acc_raw"],
                      "ned": m["ned_norm"], "n_lines": m["n_lines"], "split": m.get("split"),
                      "dataset": m.get("dataset")}
        preds[name] = _read_jsonl(compare / name / "predictions.jsonl")
    # The first lines of the split, not hand-picked ones: what a newcomer sees is what the split holds.
    examples = [{"reference": f["reference"], base: b["hypothesis"], finetuned: f["hypothesis"]}
                for b, f in zip(preds[base][:N_EXAMPLES], preds[finetuned][:N_EXAMPLES], strict=True)]
    out = {"test": test, "examples": examples, "report": str(compare / "report.md")}
    if run is not None:
        r = _read_json(run / "all_results.json")
        out["in_training"] = {k: r.get(k) for k in ("eval_before_cer", "eval_cer", "eval_before_line_acc",
                                                    "eval_line_acc", "train_wall_s", "global_step")}
    if data is not None:
        g = _read_json(data / "generation.json")
        out["fonts"] = g.get("font_files") or [{"file": name} for name in g.get("fonts", [])]
        out["renderer"] = g.get("renderer")
        out["data"] = {"preset": g.get("preset"), "seed": g.get("seed"), "sizes": g.get("sizes")}
    out["environment"] = environment()
    return out


def render(s: dict, base: str, finetuned: str) -> str:
    """The console text of ``collect``'s dict."""
    t = s["test"]
    lines = [f"== demo summary: {t[finetuned]['n_lines']} held-out {t[finetuned]['split']} lines "
             f"of {t[finetuned]['dataset']} ==",
             f"{'':12}{'CER':>8}{'line acc':>10}{'NED':>8}"]
    for name in (base, finetuned):
        lines.append(f"{name:12}{t[name]['cer']:8.3f}{t[name]['line_acc']:10.1%}{t[name]['ned']:8.3f}")
    if (it := s.get("in_training")) and it.get("eval_cer") is not None:
        lines.append(f"during training (eval subset): CER {it['eval_before_cer']:.3f} -> {it['eval_cer']:.3f}, "
                     f"line acc {it['eval_before_line_acc']:.1%} -> {it['eval_line_acc']:.1%}, "
                     f"{it['train_wall_s']:.0f} s of training")
    lines.append(f"first {len(s['examples'])} test lines (reference / {base} / {finetuned}):")
    for ex in s["examples"]:
        mark = "ok" if ex[finetuned] == ex["reference"] else "wrong"
        lines.append(f"  {ex['reference']!r:>16}  {ex[base][:24]!r:28} {ex[finetuned]!r} ({mark})")
    if fonts := s.get("fonts"):
        lines.append("fonts used by the generator:")
        lines += [f"  {f['file']}" + (f"  sha256 {f['sha256']}" if "sha256" in f else "") for f in fonts]
    env, rnd = s["environment"], s.get("renderer") or {}
    lines.append(f"environment: torch {env['torch']} with {env['torch_threads']} threads on {env['cpu_count']} CPUs "
                 f"({env['cpu']}), Python {env['python']}"
                 + (f", Pillow {rnd.get('pillow')} / FreeType {rnd.get('freetype2')}" if rnd else ""))
    lines.append(f"comparison report: {s['report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; see the module docstring. Returns the summary dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", required=True, help="eval_cer.py --out folder of the base vs fine-tuned run")
    p.add_argument("--run", help="training run folder (all_results.json)")
    p.add_argument("--data", help="dataset folder (generation.json)")
    p.add_argument("--base", default="base", help="--name of the base model in eval_cer.py")
    p.add_argument("--finetuned", default="finetuned", help="--name of the fine-tuned model in eval_cer.py")
    a = p.parse_args(argv)
    compare = Path(a.compare)
    s = collect(compare, Path(a.run) if a.run else None, Path(a.data) if a.data else None, a.base, a.finetuned)
    (compare / "summary.json").write_text(json.dumps(s, ensure_ascii=False, indent=2), encoding="utf-8")
    print(render(s, a.base, a.finetuned))
    return s


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
