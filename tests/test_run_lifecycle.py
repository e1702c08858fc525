"""What happens around a training run: fail fast before the model loads, finished runs, requeues, skipped records.

All on the tiny v1 through ``train_lora.main`` or the CLI, real data and model, no mocks (the only patch
replaces ``load_base`` with a tripwire, to prove the model was never loaded).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CONFIG

from data.loader import DataSourceError
from train import train_lora

QUICK = ["training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.logging_steps=1",
         "data.max_train_samples=8", "training.warmup_steps=0", "training.save_total_limit=null"]


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train" / "train_lora.py"), "--config",
                           str(TINY_CONFIG["deepseek_ocr_v1"]), "training.report_to=[]", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model would load."""
    import dsocr.loading

    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the data problem was reported")

    monkeypatch.setattr(dsocr.loading, "load_base", tripwire)


# ---------------------------------------------------------------- fail fast


def test_wrong_dataset_path_fails_before_the_model_loads(tiny_cfg, tmp_path, no_model_load):
    cfg = tiny_cfg("deepseek_ocr_v1", f"data.dataset={tmp_path / 'no_such_data'}")
    with pytest.raises(DataSourceError, match="source_not_found"):
        train_lora.main(cfg)


def test_missing_split_fails_before_the_model_loads(tiny_cfg, no_model_load):
    cfg = tiny_cfg("deepseek_ocr_v1", "data.eval_split=validation")
    with pytest.raises(DataSourceError, match=r"split 'validation' not found .* available splits: \['test', 'train', 'val'\]"):
        train_lora.main(cfg)


def test_missing_local_model_folder_names_it_and_the_fix(demo_data, tmp_path):
    proc = _cli(f"data.dataset={demo_data}", f"output_dir={tmp_path / 'run'}", "model.name_or_path=runs/nope/tiny_v1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error: model.name_or_path 'runs/nope/tiny_v1' does not exist" in proc.stderr
    assert "python -m dsocr.models.make_tiny --family deepseek_ocr_v1 --out runs/nope/tiny_v1" in proc.stderr


def test_latest_without_checkpoint_is_a_message_not_a_traceback(demo_data, tmp_path):
    proc = _cli(f"data.dataset={demo_data}", f"output_dir={tmp_path / 'run'}", "resume_from_checkpoint=latest")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"error: resume_from_checkpoint=latest but '{tmp_path / 'run'}' holds no complete checkpoint-N" in proc.stderr
    assert "resume_from_checkpoint=auto" in proc.stderr


# ---------------------------------------------------------------- finished runs and requeues


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resuming_a_finished_run_trains_nothing(tiny_cfg, tmp_path):
    """The issue's case: 12 steps, saves every 3; the same command resumed must not train a 13th step."""
    run = tmp_path / "run"
    args = [*QUICK, "training.max_steps=12", "training.save_steps=3"]
    train_lora.main(tiny_cfg("deepseek_ocr_v1", *args))
    final_before = _files(run / "final")
    for mode in ("latest", "auto"):
        out = train_lora.main(tiny_cfg("deepseek_ocr_v1", *args, f"resume_from_checkpoint={mode}"))
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6",
                                                                     "checkpoint-9"]
        assert _files(run / "final") == final_before  # final/ not overwritten
        assert out["already_finished"] is True and out["global_step"] == 12
    # A job that died after its last checkpoint but before final/: the requeue writes final/ from it.
    shutil.rmtree(run / "final")
    out = train_lora.main(tiny_cfg("deepseek_ocr_v1", *args, "resume_from_checkpoint=auto"))
    assert out["already_finished"] is True
    ckpt = _files(run / "checkpoint-12")
    assert _files(run / "final")["adapter_model.safetensors"] == ckpt["adapter_model.safetensors"]
    assert (run / "final" / "run_config.yaml").is_file() and not (run / "checkpoint-13").exists()


def test_auto_on_an_empty_folder_starts_fresh(tiny_cfg, tmp_path):
    out = train_lora.main(tiny_cfg("deepseek_ocr_v1", *QUICK, "training.max_steps=2", "training.save_steps=2",
                                   "resume_from_checkpoint=auto"))
    assert "already_finished" not in out
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "run" / "final").is_dir()
    assert "resume_from_checkpoint=auto: no complete checkpoint" in (tmp_path / "run" / "train.log").read_text()


# ---------------------------------------------------------------- skipped records with DataLoader workers


def _manifest_with_bad_records(demo_data, tmp_path):
    """A JSONL manifest copy of the demo data whose train and val splits each hold one corrupt image."""
    from data.loader import load_split

    root = tmp_path / "manifest"
    (root / "img").mkdir(parents=True)
    for split, n in (("train", 12), ("val", 4)):
        rows = load_split(str(demo_data), split, max_samples=n)
        lines = []
        for i, rec in enumerate(rows):
            name = f"img/{split}-{i}.png"
            (root / name).write_bytes(rec["image"]["bytes"])
            lines.append({"image": name, "text": rec["text"], "id": f"{split}-{i}"})
        (root / f"img/{split}-bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        lines.insert(3, {"image": f"img/{split}-bad.png", "text": "坏", "id": f"{split}-bad"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return root


def test_skipped_records_counted_once_across_workers_and_evaluations(demo_data, tiny_cfg, tmp_path):
    data = _manifest_with_bad_records(demo_data, tmp_path)
    cfg = tiny_cfg("deepseek_ocr_v1", f"data.dataset={data}", "data.on_bad_record=skip", "data.max_eval_samples=null",
                   "training.per_device_train_batch_size=2", "training.per_device_eval_batch_size=2",
                   "training.max_steps=8", "training.eval_steps=2", "training.save_steps=4", "eval.train_cer_samples=2",
                   "training.dataloader_num_workers=2", "training.logging_steps=2", "training.warmup_steps=0")
    metrics = train_lora.main(cfg)
    # The bad train record was met inside the DataLoader workers (the main process's collator saw none),
    # the bad eval record at each of the 6 evaluations: each is still one skipped record.
    assert metrics["skipped_records"] == 1
    assert metrics["skipped_eval_records"] == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "skipped_records.jsonl").read_text().splitlines()]
    assert {(r["split"], r["id"], r["reason"]) for r in logged} == {("train", "train-bad", "corrupt_image"),
                                                                   ("val", "val-bad", "corrupt_image")}
