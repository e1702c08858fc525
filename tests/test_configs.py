"""Every shipped YAML validates; bad keys, types and values fail fast with a message naming them."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsocr.config import ConfigError, RunConfig, load_config, training_arguments

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"v1_lora_zh.yaml", "ocr2_lora_zh.yaml", "tiny_cpu.yaml", "tiny_cpu_ocr2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    args = training_arguments(cfg, use_cpu=True) if "use_cpu" not in cfg.training else training_arguments(cfg)
    assert args.output_dir == cfg.output_dir
    assert args.remove_unused_columns is False
    assert cfg.collator.instruction == "<image>\nFree OCR."


def test_seed_recipe_values():
    for name in ("v1_lora_zh.yaml", "ocr2_lora_zh.yaml"):
        cfg = load_config(REPO / "configs" / name)
        t = cfg.training
        assert (cfg.lora.r, cfg.lora.alpha) == (16, 16)
        assert list(cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (2, 4, 1e-4)
        assert (t.warmup_steps, t.max_steps, t.save_steps, t.save_total_limit, t.eval_steps, t.logging_steps) == (200, 5000, 500, 3, 500, 50)
        assert t.bf16 is True and cfg.data.dataset == "priyank-m/chinese_text_recognition"
        assert cfg.collator.image_mode == "gundam"
    assert load_config(REPO / "configs" / "v1_lora_zh.yaml").model.family == "deepseek_ocr_v1"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=8", "unknown key 'lora.rank'; valid keys in lora: r, alpha, dropout, target_modules"),
        ("model.famly=x", "did you mean 'model.family'?"),
        ("lora.r=eight", "lora.r"),
        ("model.family=llama", "model.family 'llama' is not one of deepseek_ocr_v1, deepseek_ocr2"),
        ("data.on_bad_record=ignore", "data.on_bad_record 'ignore' is not one of error, skip"),
        ("collator.instruction=Free OCR.", "must contain '<image>' exactly once"),
        ("training.output_dir=/tmp/x", "training.output_dir is not allowed here"),
        ("resume_from_checkpoint=/no/such/ckpt", "resume_from_checkpoint '/no/such/ckpt' is not a folder"),
        ("eval.train_cer_samples=0", "training.metric_for_best_model 'eval_cer' needs CER during training"),
    ],
)
def test_bad_values_are_named(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_cpu.yaml", [override])
    assert expected in str(e.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["lora.rank=8", "data.datset=x"])
    assert "lora.rank" in str(e.value) and "data.datset" in str(e.value)


def test_misspelled_training_key_names_it():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["training.lerning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"training\.lerning_rate' \(did you mean 'training\.learning_rate'\?\)"):
        training_arguments(cfg)


def test_flag_style_argument_is_rejected():
    with pytest.raises(ConfigError, match="use key=value, e.g. training.learning_rate=1e-4"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["--lr=3"])


def test_scientific_notation_is_a_float():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["training.learning_rate=3e-4", "lora.dropout=5e-2"])
    assert cfg.training.learning_rate == 3e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.lora.dropout == 0.05


def test_missing_required_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {family: deepseek_ocr_v1}\ndata: {dataset: x}\n")
    with pytest.raises(ConfigError, match="required keys without a value: model.name_or_path, output_dir"):
        load_config(p)


def test_every_schema_field_is_read():
    """A field no code reads is a lie in the YAML (open-r1's pitfall): grep the sources for each."""
    import dataclasses

    sources = "\n".join(p.read_text() for d in ("train", "eval", "collator", "data") for p in (REPO / d).rglob("*.py"))
    sections = {f.name: f.default_factory() for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None)}
    for section, obj in sections.items():
        for f in dataclasses.fields(obj):
            assert f".{section}.{f.name}" in sources or f"{section}.{f.name}" in sources or f"ev.{f.name}" in sources or f"d.{f.name}" in sources, f"{section}.{f.name} is never read"


def test_cli_misspelled_key_fails_fast():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "train_lora.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "lora.rnak=8"],
        capture_output=True, text=True, cwd=REPO,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "unknown key 'lora.rnak'" in proc.stderr and "did you mean 'lora.r'" not in proc.stderr or "lora.rnak" in proc.stderr
    assert elapsed < 5.0, f"config error took {elapsed:.1f} s"
