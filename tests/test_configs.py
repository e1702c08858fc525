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
        # The seed's effective batch 8 (2 x 4) as 8 x 1: the same update (tests/test_grad_accumulation.py).
        assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (8, 1, 1e-4)
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
        ("collator.image_mode=gundum", "collator.image_mode 'gundum' is not one of default, tiny, small, base, large, "
                                       "gundam for deepseek_ocr_v1 (did you mean 'gundam'?)"),
        ("data.max_image_aspect=0.5", "max_image_aspect >= 1"),
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


def _schema_keys() -> set[str]:
    """Every leaf key of the schema (``training`` is a free mapping for TrainingArguments: one key)."""
    import dataclasses

    keys = set()
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.update(f"{f.name}.{sub.name}" for sub in dataclasses.fields(default))
        else:
            keys.add(f.name)
    return keys


def test_every_schema_field_is_read(tiny_cfg, tmp_path, monkeypatch):
    """A field no code reads is a lie in the YAML (open-r1's pitfall).

    Every attribute read of the config is recorded while the three scripts run for real on the tiny model
    (train with evaluation and a checkpoint, eval_cer and eval_ppl on that checkpoint); each schema field
    must have been read by one of them.
    """
    from omegaconf import DictConfig

    from eval import eval_cer, eval_ppl
    from train import train_lora

    read: set[str] = set()
    real_getattr = DictConfig.__getattr__

    def recording_getattr(self, key):
        value = real_getattr(self, key)
        try:
            read.add(self._get_full_key(key))
        except Exception:  # noqa: BLE001 - bookkeeping must never change what the code sees
            pass
        return value

    monkeypatch.setattr(DictConfig, "__getattr__", recording_getattr)
    cfg = tiny_cfg("deepseek_ocr_v1", "training.max_steps=1", "training.eval_steps=1", "training.save_steps=1",
                   "training.per_device_train_batch_size=2", "data.max_train_samples=4", "data.max_eval_samples=2",
                   "eval.train_cer_samples=2", "eval.max_samples=2")
    train_lora.main(cfg)
    ckpt = tmp_path / "run" / "checkpoint-1"
    eval_cer.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "cer")])
    eval_ppl.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "ppl")])
    never = sorted(_schema_keys() - read)
    assert never == [], f"schema fields no script read: {never}"


def test_the_read_check_sees_an_unread_field():
    """The recorder can fail: a key that is not in the schema is never among the keys read."""
    assert "lora.rank" not in _schema_keys() and "lora.r" in _schema_keys() and "training" in _schema_keys()


def test_cli_misspelled_key_fails_fast():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "train_lora.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "lora.rnak=8"],
        capture_output=True, text=True, cwd=REPO,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "error: " in proc.stderr
    assert "unknown key 'lora.rnak'" in proc.stderr
    assert "valid keys in lora: r, alpha, dropout, target_modules" in proc.stderr
    assert elapsed < 5.0, f"config error took {elapsed:.1f} s"


def test_ddp_does_not_rebroadcast_buffers_unless_asked(tiny_cfg):
    """v1's pooled expert adapters keep ~4,000 buffer views: DDP must not re-broadcast buffers every forward."""
    assert training_arguments(tiny_cfg("deepseek_ocr_v1")).ddp_broadcast_buffers is False
    assert training_arguments(tiny_cfg("deepseek_ocr_v1", "training.ddp_broadcast_buffers=true")).ddp_broadcast_buffers is True


def test_shipped_gpu_configs_leave_cudnn_attention_off():
    """cuDNN's SDPA plans each new shape: slower on every measured layout (dsocr/config.py, ModelConfig)."""
    for name in ("v1_lora_zh.yaml", "ocr2_lora_zh.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.model.cudnn_attention is False, name
