"""Where ``eval/eval_cer.py``'s time goes: preprocessing, prefill, decoding, host work (a diagnosis tool).

    python -m bench.profile_eval --model DIR --data DIR --out OUT [--lines 512] [--batch 128] [--new-tokens 16]

Loads the model through the evaluation's own path (``dsocr.loading.load_for_eval`` on
``configs/v1_lora_zh.yaml``), takes the test split's first ``--lines`` records as ``eval_cer.py`` does, and
times, each synchronised: one batch's preprocessing in this process, the DataLoader's first batch, the prefill
forward of one batch, ``generate`` of one batch with 1 and with ``--new-tokens`` new tokens, and the whole
``dsocr.generation.generate_batched`` call (the figure ``eval_cer.py`` reports). A ``torch.profiler`` table
of one ``generate`` call goes to ``OUT/profile_generate.txt``. The single-batch figures are parts of the
real path, not a speed claim of their own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Run the timings; write ``OUT/profile_eval.json``."""
    import torch

    from dsocr.config import load_config
    from dsocr.datasets import load_eval_records
    from dsocr.devices import batch_to, default_device, model_dtype
    from dsocr.generation import GenerationSettings, generate_batched
    from dsocr.loading import load_for_eval

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lines", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--config", default=str(REPO / "configs" / "v1_lora_zh.yaml"))
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    p.add_argument("--variants", nargs="*", default=[],
                   help="more generate_batched runs on the loaded model, each 'flex=0|1,workers=N,batch=N'")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = default_device()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        value = fn()
        sync()
        return value, time.perf_counter() - t0

    cfg = load_config(a.config, [f"data.dataset={a.data}", "eval.split=test", f"eval.max_samples={a.lines}",
                                 f"eval.batch_size={a.batch}", f"eval.max_new_tokens={a.new_tokens}", *a.set])
    (loaded, load_s) = timed(lambda: load_for_eval(a.model, cfg=cfg, device=device))
    model = loaded.model
    records = load_eval_records(cfg)
    collator = loaded.make_collator(train=False)
    tok = loaded.tokenizer
    settings = GenerationSettings(batch_size=a.batch, max_new_tokens=a.new_tokens,
                                  no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size, num_workers=cfg.eval.num_workers)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "lines": len(records),
              "batch": a.batch, "new_tokens": a.new_tokens, "load_s": round(load_s, 2), "overrides": a.set}

    (batch, ids, refs), result["preprocess_one_batch_s"] = timed(lambda: collator.generation_batch(records[:a.batch]))
    dtype = model_dtype(model)
    gpu_batch, result["to_device_s"] = timed(lambda: batch_to(batch, device, dtype))
    result["prompt_width"] = int(gpu_batch["input_ids"].shape[1])

    gen = dict(do_sample=False, num_beams=1, no_repeat_ngram_size=settings.no_repeat_ngram_size or None,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)
    with torch.no_grad():
        for _ in range(2):  # warm-up: kernels, allocator
            model.generate(**gpu_batch, max_new_tokens=2, **gen)
        _, result["prefill_forward_s"] = timed(lambda: model(**gpu_batch, use_cache=True))
        _, result["generate_1_token_s"] = timed(lambda: model.generate(**gpu_batch, max_new_tokens=1, **gen))
        gen_out, result["generate_n_tokens_s"] = timed(
            lambda: model.generate(**gpu_batch, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **gen))
        result["decode_step_ms"] = round(1000 * (result["generate_n_tokens_s"] - result["generate_1_token_s"])
                                         / max(a.new_tokens - 1, 1), 2)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            model.generate(**gpu_batch, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **gen)
            sync()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    table += "\n\n# by host self time\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out / "profile_generate.txt").write_text(table)

    result["one_batch_timings"] = {}
    _, result["generate_batched_one_batch_s"] = timed(lambda: generate_batched(
        model, collator, records[:a.batch], settings, device, progress=False, timings=result["one_batch_timings"]))
    result["timings"] = {}
    _, result["generate_batched_s"] = timed(lambda: generate_batched(model, collator, records, settings, device,
                                                                     progress=False, timings=result["timings"]))
    result["lines_per_s"] = round(len(records) / result["generate_batched_s"], 2)
    result["variants"] = []
    for spec in a.variants:
        opts = dict(item.split("=", 1) for item in spec.split(","))
        for m in model.modules():
            if hasattr(m, "use_flex"):
                m.use_flex = opts.get("flex", "0") == "1"
        var = GenerationSettings(batch_size=int(opts.get("batch", a.batch)), max_new_tokens=a.new_tokens,
                                 no_repeat_ngram_size=settings.no_repeat_ngram_size,
                                 num_workers=int(opts["workers"]) if "workers" in opts else settings.num_workers)
        generate_batched(model, collator, records[:var.batch_size], var, device, progress=False)  # warm-up
        row = {"spec": spec, "timings": {}}
        preds, row["seconds"] = timed(lambda: generate_batched(model, collator, records, var, device, progress=False,
                                                               timings=row["timings"]))
        row["lines_per_s"] = round(len(records) / row["seconds"], 2)
        row["hypotheses"] = [p["hypothesis"] for p in preds]
        result["variants"].append(row)
        print(spec, row["lines_per_s"], row["timings"], flush=True)
    if result["variants"]:
        first = result["variants"][0]["hypotheses"]
        for row in result["variants"]:
            row["differs_from_first"] = sum(a != b for a, b in zip(row["hypotheses"], first, strict=True))
            del row["hypotheses"]
    result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    for k, v in list(result.items()):
        if isinstance(v, float):
            result[k] = round(v, 4)
    (out / "profile_eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
