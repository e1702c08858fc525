"""infer/export.py on tiny models: merged exports predict exactly like their checkpoint, in the official layout.

The v1 checkpoint comes from ``trained_v1_run`` (conftest): a tiny random v1 that learnt 8 lines. Its fp32
export (``exported_v1``) must give eval_cer.py the same predictions and CER as the checkpoint itself.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_v1_model import official_config_dict

from dsocr.export import ExportError, export_checkpoint, v1_hub_config, weight_files, weight_shapes
from eval import eval_cer
from infer import export as export_cli

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "deepseek_ocr_v1"
LINES = ["eval.split=train", "eval.max_samples=8", "eval.batch_size=8", "eval.max_new_tokens=24"]


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def _eval(ckpt: Path, out: Path, config: Path | None = None) -> dict:
    args = ["--ckpt", str(ckpt), "--out", str(out), *LINES]
    if config is not None:
        args[2:2] = ["--config", str(config)]
    return list(eval_cer.main(args).values())[0]


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", key))


def test_fp32_export_predicts_exactly_like_the_checkpoint(trained_v1_run, exported_v1, tmp_path):
    ckpt = trained_v1_run / "checkpoint-60"
    direct = _eval(ckpt, tmp_path / "ckpt")
    merged = _eval(exported_v1, tmp_path / "export", config=ckpt / "run_config.yaml")
    a, b = _predictions(tmp_path / "ckpt"), _predictions(tmp_path / "export")
    assert [p["id"] for p in a] == [p["id"] for p in b] and len(a) == 8
    assert [p["hypothesis"] for p in a] == [p["hypothesis"] for p in b]
    assert merged["cer_raw"] == direct["cer_raw"] and merged["cer_norm"] == direct["cer_norm"]
    # The lines it learnt are read back, so "identical" compares real transcriptions, not two empty strings.
    assert direct["line_acc_raw"] >= 0.5, [(p["reference"], p["hypothesis"]) for p in a]
    for x, y in zip(a, b):  # same model up to fp32 rounding of W + BA: the same token probabilities
        assert abs(x["confidence_mean"] - y["confidence_mean"]) < 1e-4 and abs(x["confidence_min"] - y["confidence_min"]) < 1e-4


def test_export_has_the_official_key_pattern_and_no_peft_prefixes(tiny_model_dirs, exported_v1):
    shapes = weight_shapes(weight_files(exported_v1))
    assert not [k for k in shapes if k.startswith("base_model.") or "lora_" in k or "base_layer" in k]
    # Exactly the base checkpoint's keys and shapes, LoRA merged in.
    assert shapes == weight_shapes(weight_files(tiny_model_dirs("deepseek_ocr_v1")))
    # The same key pattern as the full-size official checkpoint (layer and expert numbers aside).
    golden = json.loads((GOLDEN / "state_dict_full.json").read_text())
    official = {_pattern(k) for k in golden["shapes"] if k not in golden["non_float_keys"]}
    assert {_pattern(k) for k in shapes} == official
    assert any(re.fullmatch(r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight", k) for k in shapes)
    # The merge moved the adapted weights away from the base, and only those.
    base = tiny_model_dirs("deepseek_ocr_v1") / "model.safetensors"
    with safe_open(str(base), "pt") as fb, safe_open(str(exported_v1 / "model.safetensors"), "pt") as fe:
        changed = {k for k in shapes if not torch.equal(fb.get_tensor(k), fe.get_tensor(k))}
    assert changed and all(re.search(r"(self_attn\.[qkvo]_proj|(gate|up|down)_proj)\.weight$", k) for k in changed)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed


def test_export_folder_loads_like_the_base_with_hub_config_tokenizer_and_card(exported_v1, trained_v1_run):
    from dsocr.models import get_family
    from dsocr.models.tokenizer import load_tokenizer

    config = json.loads((exported_v1 / "config.json").read_text())
    official = official_config_dict()
    assert set(official) <= set(config)  # every field of the hub file
    assert config["model_type"] == "deepseek_vl_v2" and config["architectures"] == ["DeepseekOCRForCausalLM"]
    assert config["language_config"]["n_routed_experts"] == 4 and config["tile_tag"] == "2D"
    model = get_family("deepseek_ocr_v1").load_model(str(exported_v1))  # from_pretrained, like the base
    assert model.config.hidden_size == 256 and model.config.sam_width == 32
    tok = load_tokenizer(str(exported_v1))
    assert tok.convert_tokens_to_ids("<image>") == 128815
    special = json.loads((exported_v1 / "special_tokens_map.json").read_text())
    assert "<image>" in special["additional_special_tokens"]
    card = (exported_v1 / "README.md").read_text()
    for fact in ("checkpoint-60", "step 60", "image mode: **tiny**", "stock vLLM always preprocesses in Gundam mode",
                 "LoRA r=16, alpha=32", "CER (raw)", str(trained_v1_run.parent.parent.name)):
        assert fact in card, fact
    assert (exported_v1 / "run_config.yaml").read_bytes() == (trained_v1_run / "checkpoint-60" / "run_config.yaml").read_bytes()


def test_generated_hub_config_has_every_official_field_and_value():
    from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig

    generated = v1_hub_config(DeepseekOCRConfig(pad_token_id=2), "bfloat16")
    official = official_config_dict()
    different = {k: (generated.get(k), v) for k, v in official.items() if k != "transformers_version" and generated.get(k) != v}
    assert different == {}


def test_hub_style_base_config_is_copied_byte_for_byte(trained_v1_run, tiny_model_dirs, exported_v1, tmp_path):
    # A base folder with a hub-style config.json (formatted its own way) and a checkpoint trained on it.
    base = tmp_path / "deepseek_ocr_v1"
    shutil.copytree(tiny_model_dirs("deepseek_ocr_v1"), base)
    from dsocr.models import get_family

    config = v1_hub_config(get_family("deepseek_ocr_v1").load_model(str(base)).config, "float32")
    raw = json.dumps(config, indent=1, ensure_ascii=True).encode() + b"\n\n"
    (base / "config.json").write_bytes(raw)
    ckpt = tmp_path / "run" / "checkpoint-60"
    shutil.copytree(trained_v1_run / "checkpoint-60", ckpt)
    run_cfg = (ckpt / "run_config.yaml").read_text().replace(str(tiny_model_dirs("deepseek_ocr_v1")), str(base))
    (ckpt / "run_config.yaml").write_text(run_cfg)
    out = export_checkpoint(ckpt, tmp_path / "out", dtype="bfloat16", max_shard_size="40MB")
    assert (out / "config.json").read_bytes() == raw
    # 40 MB shards of a 136 MB bf16 model: an index like the hub's, every key in exactly one shard.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(weight_shapes([out / s for s in shards]))
    # bf16 = the float32 merge (the fp32 export of the same adapter on the same weights) rounded once.
    with safe_open(str(exported_v1 / "model.safetensors"), "pt") as f:
        for shard in shards:
            with safe_open(str(out / shard), "pt") as g:
                for key in g.keys():  # noqa: SIM118
                    assert g.get_tensor(key).dtype == torch.bfloat16
                    assert torch.equal(g.get_tensor(key), f.get_tensor(key).to(torch.bfloat16)), key


def test_adapter_only_is_a_plain_peft_adapter_of_the_language_model(trained_v1_run, tiny_model_dirs, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from dsocr.models import get_family

    out = export_checkpoint(trained_v1_run / "final", tmp_path / "lora", adapter_only=True, dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "run_config.yaml"]
    state = load_file(str(out / "adapter_model.safetensors"))
    assert state and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in state)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "auto_mapping" not in cfg and cfg["base_model_name_or_path"] == str(tiny_model_dirs("deepseek_ocr_v1"))
    # Plain PEFT loads it and computes what the pipeline's own loader computes.
    family = get_family("deepseek_ocr_v1")
    plain = PeftModel.from_pretrained(family.load_model(str(tiny_model_dirs("deepseek_ocr_v1"))), str(out)).eval()
    from dsocr.loading import load_for_eval

    ours = load_for_eval(str(trained_v1_run / "final"), device=torch.device("cpu")).model
    ids = torch.tensor([[0, 201, 21431, 126041, 16, 1880, 1418]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_export_refuses_with_what_which_and_how_to_fix(trained_v1_run, tiny_model_dirs, tmp_path, monkeypatch):
    ckpt = trained_v1_run / "checkpoint-60"

    def refused(*args, **kwargs) -> str:
        with pytest.raises(ExportError) as e:
            export_checkpoint(*args, **kwargs)
        return str(e.value)

    # an incomplete checkpoint: the adapter weights were cut off mid-save
    broken = tmp_path / "run" / "checkpoint-60"
    shutil.copytree(ckpt, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    msg = refused(broken, tmp_path / "a")
    assert "not complete" in msg and "adapter_model.safetensors" in msg and "To fix" in msg
    msg = refused(tmp_path / "run", tmp_path / "a")  # the run folder, not a checkpoint
    assert "holds no model" in msg and str(tmp_path / "run") in msg and "To fix" in msg
    # an adapter trained on another base than --base
    other = tiny_model_dirs("deepseek_ocr2")
    msg = refused(ckpt, tmp_path / "b", base=str(other))
    assert str(other) in msg and str(tiny_model_dirs("deepseek_ocr_v1")) in msg and "--base" in msg
    # ... also when a folder of the same name holds another model (two random tiny models)
    from dsocr.models.make_tiny import make_tiny

    lookalike = make_tiny("deepseek_ocr_v1", tmp_path / "elsewhere" / "deepseek_ocr_v1", seed=1)
    assert "trained on base model" in refused(ckpt, tmp_path / "b", base=str(lookalike))
    # an output folder that exists (not empty), without --force
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("keep me")
    msg = refused(ckpt, tmp_path / "taken")
    assert "already exists" in msg and "--force" in msg and (tmp_path / "taken" / "x.txt").exists()
    # --out on the checkpoint itself is never replaced, even with --force
    assert "destroy" in refused(ckpt, ckpt.parent, force=True)
    # a disk too small for the estimated size
    import dsocr.export as export_module

    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=10**6))
    msg = refused(ckpt, tmp_path / "c", dtype="float32")
    assert "not enough disk space" in msg and "1.0 MB are free" in msg and "--dtype bfloat16" in msg
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_cli_exits_with_the_reason(trained_v1_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--ckpt", str(trained_v1_run / "checkpoint-60"), "--out", str(tmp_path / "taken")])
    assert str(e.value).startswith("error: --out") and "--force" in str(e.value)


def test_ocr2_export_predicts_like_its_checkpoint_in_the_transformers_layout(tiny_cfg, tiny_model_dirs, tmp_path):
    from train import train_lora

    cfg = tiny_cfg("deepseek_ocr2", "data.max_train_samples=8", "training.per_device_train_batch_size=4",
                   "training.max_steps=3", "training.eval_strategy=no", "training.save_strategy=no",
                   "eval.train_cer_samples=0", "training.warmup_steps=1")
    train_lora.main(cfg)
    final = tmp_path / "run" / "final"
    out = export_cli.main(["--ckpt", str(final), "--out", str(tmp_path / "ocr2_f32"), "--dtype", "float32"])
    base = tiny_model_dirs("deepseek_ocr2")
    assert (Path(out) / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (Path(out) / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    assert weight_shapes(weight_files(Path(out))) == weight_shapes(weight_files(base))
    args = ["eval.split=test", "eval.max_samples=4", "eval.batch_size=4", "eval.max_new_tokens=12"]
    eval_cer.main(["--ckpt", str(final), "--out", str(tmp_path / "e1"), *args])
    eval_cer.main(["--ckpt", out, "--config", str(final / "run_config.yaml"), "--out", str(tmp_path / "e2"), *args])
    assert [p["hypothesis"] for p in _predictions(tmp_path / "e1")] == [p["hypothesis"] for p in _predictions(tmp_path / "e2")]
