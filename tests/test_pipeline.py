"""End to end on tiny random-weight models of both families: train, checkpoint, resume, evaluate.

Real classes, real tokenizer, generated data: no mocks. The memorisation test is the proof that
labels, image slots and generation line up: a model that learnt a few lines must read them back exactly.
"""

import json

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file

from eval import eval_cer
from train import train_lora

FAST = ["training.per_device_train_batch_size=2", "training.per_device_eval_batch_size=4", "training.warmup_steps=1",
        "training.logging_steps=1", "data.max_train_samples=16", "data.max_eval_samples=4", "eval.train_cer_samples=4",
        "eval.batch_size=4"]


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_checkpoint_resume_evaluate(family, tiny_cfg, tiny_model_dirs, tmp_path):
    # ---- an uninterrupted run of 4 steps, checkpoints at 2 and 4
    base_hash = _sha256(tiny_model_dirs(family) / "model.safetensors")
    cfg = tiny_cfg(family, *FAST, "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2")
    metrics = train_lora.main(cfg)
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = run / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                     "trainer_state.json", "run_config.yaml"):
            assert (ckpt / name).is_file(), f"{ckpt.name} lacks {name}"
    assert (run / "run_config.yaml").is_file() and (run / "final" / "run_config.yaml").is_file()
    for key in ("eval_cer", "eval_perplexity", "eval_before_cer", "eval_before_perplexity", "eval_line_acc"):
        assert key in metrics, key
    # LoRA moved, the base did not: the adapter holds only LoRA tensors, some of them changed from their
    # init (B starts at zero), the optimizer state covers exactly those tensors (so no base weight was ever
    # stepped), and the base checkpoint file is byte for byte what it was before training.
    final = adapter(run / "final")
    assert final and all(".lora_A." in k or ".lora_B." in k for k in final), sorted(final)[:4]
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in final.items())
    optim = torch.load(run / "checkpoint-4" / "optimizer.pt", weights_only=False)
    stepped = sum(t.numel() for st in optim["state"].values() for name, t in st.items() if name == "exp_avg")
    assert stepped == sum(v.numel() for v in final.values())
    assert _sha256(tiny_model_dirs(family) / "model.safetensors") == base_hash
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"].endswith(family)

    # ---- resume from checkpoint-2 in a fresh folder: continues at step 3 with the saved optimizer/scheduler
    import shutil

    run2 = tmp_path / "run2"
    run2.mkdir()
    shutil.copytree(run / "checkpoint-2", run2 / "checkpoint-2")
    cfg2 = tiny_cfg(family, *FAST, "training.max_steps=4", "training.save_steps=2", "training.eval_steps=2",
                    f"output_dir={run2}", "resume_from_checkpoint=latest")
    train_lora.main(cfg2)
    state = json.loads((run2 / "checkpoint-4" / "trainer_state.json").read_text())
    steps_logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps_logged[:2] == [1, 2] and steps_logged[-1] == 4  # history restored, then 3 and 4 trained
    full = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    lr_full = {e["step"]: e["learning_rate"] for e in full["log_history"] if "learning_rate" in e}
    lr_res = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert lr_res[3] == lr_full[3] and lr_res[4] == lr_full[4]  # scheduler state
    resumed = adapter(run2 / "checkpoint-4")
    # Same data order, optimizer moments and RNG: the resumed adapter equals the uninterrupted one.
    for k, v in adapter(run / "checkpoint-4").items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=f"{k} differs after resume")

    # ---- the checkpoint alone drives evaluation, deterministically, batch size independent
    out1 = eval_cer.main(["--ckpt", str(run / "checkpoint-4"), "--out", str(tmp_path / "e1"), "eval.max_samples=6", "eval.batch_size=6"])
    eval_cer.main(["--ckpt", str(run / "checkpoint-4"), "--out", str(tmp_path / "e2"), "eval.max_samples=6", "eval.batch_size=1"])
    p1 = [json.loads(line) for line in (tmp_path / "e1" / "predictions.jsonl").read_text().splitlines()]
    p2 = [json.loads(line) for line in (tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()]
    assert [p["hypothesis"] for p in p1] == [p["hypothesis"] for p in p2], "batched != one-at-a-time"
    assert len(p1) == 6 and all({"id", "reference", "hypothesis", "cer_raw", "error_kinds"} <= set(p) for p in p1)
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["n_lines"] == 6 and 0 <= m["line_acc_raw"] <= 1 and list(out1.values())[0]["cer_raw"] == m["cer_raw"]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] is not None and state["best_model_checkpoint"].endswith(("checkpoint-2", "checkpoint-4"))

    # ---- the saved checkpoint reproduces the in-memory model exactly: the CER that training computed on
    # its fixed eval subset at the end equals eval_cer.py --ckpt on the same lines from the saved adapter
    again = eval_cer.main(["--ckpt", str(run / "final"), "--out", str(tmp_path / "again"), "eval.split=val",
                           "eval.max_samples=4", "eval.batch_size=4"])
    assert list(again.values())[0]["cer_raw"] == metrics["eval_cer"]
    # ... and eval_ppl.py gives the in-training perplexity, whatever its batch size (summed NLL, not means)
    from eval import eval_ppl

    for bs in (1, 4):
        ppl = eval_ppl.main(["--ckpt", str(run / "final"), "--out", str(tmp_path / f"ppl{bs}"), "eval.split=val",
                             "eval.max_samples=4", f"eval.batch_size={bs}"])
        assert ppl["target_tokens"] == metrics["eval_target_tokens"]
        assert abs(ppl["perplexity"] - metrics["eval_perplexity"]) <= 1e-4 * metrics["eval_perplexity"]
        assert (tmp_path / f"ppl{bs}" / "perplexity.json").is_file()

    # ---- base vs fine-tuned: one command, one report with plots
    from PIL import Image

    eval_cer.main(["--ckpt", str(tiny_model_dirs(family)), "--ckpt", str(run / "final"), "--name", "base",
                   "--name", "tuned", "--config", str(run / "run_config.yaml"), "--out", str(tmp_path / "cmp"),
                   "eval.max_samples=6", "eval.batch_size=6"])
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "base" in report and "tuned" in report
    pngs = sorted((tmp_path / "cmp").glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
    for name in ("base", "tuned"):
        assert (tmp_path / "cmp" / name / "metrics.json").is_file() and (tmp_path / "cmp" / name / "predictions.jsonl").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_memorisation_reads_back_exactly(family, tiny_cfg, tmp_path):
    """Train on 4 lines until they are learnt; greedy decoding must then reproduce them exactly (CER 0)."""
    cfg = tiny_cfg(family, "data.max_train_samples=4", "data.eval_split=train", "data.max_eval_samples=4",
                   "training.per_device_train_batch_size=4", "training.max_steps=100", "training.learning_rate=3e-3",
                   "training.warmup_steps=5", "training.eval_strategy=no", "training.save_strategy=no",
                   "training.logging_steps=20", "eval.train_cer_samples=0", "lora.alpha=32")
    train_lora.main(cfg)
    res = eval_cer.main(["--ckpt", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "mem"),
                         "eval.split=train", "eval.max_samples=4", "eval.batch_size=4"])
    metrics = list(res.values())[0]
    preds = [json.loads(line) for line in (tmp_path / "mem" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["cer_raw"] == 0.0, [(p["reference"], p["hypothesis"]) for p in preds]
    assert metrics["line_acc_raw"] == 1.0 and metrics["n_lines"] == 4
