"""`make demo` as the README states it: its config trains what it says, on the demo model, and ends with the summary."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dsocr.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"


def _make_vars() -> dict[str, str]:
    """``NAME := value`` lines of the Makefile (the demo's paths)."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z_]+)\s*\??:?=\s*(.*)$", text, flags=re.M)}


def _demo_recipe() -> list[str]:
    """The commands of the Makefile's ``demo`` target, in order (what ``make -n demo`` would run after setup)."""
    if shutil.which("make"):
        # --no-print-directory: under `make test` MAKEFLAGS makes a nested make print "Leaving directory".
        out = subprocess.run(["make", "-n", "--no-print-directory", "-f", "Makefile", "demo"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        # Continuation lines (backslash-newline) belong to the command above them.
        return [c for c in out.replace("\\\n", " ").splitlines() if "$(" not in c and c.strip()]
    pytest.skip("make is not installed")


def test_demo_config_trains_vision_towers_and_lora_on_the_demo_model():
    cfg = load_config(DEMO_CONFIG)
    v = _make_vars()
    assert cfg.model.train_vision is True  # a random tiny model has no pretrained vision to keep frozen
    assert cfg.model.name_or_path == v["DEMO_MODEL"]  # the folder make_tiny --demo writes
    assert cfg.data.dataset == v["DEMO_DATA"]
    assert cfg.output_dir == v["DEMO_RUN"]
    assert cfg.collator.image_mode == "tiny"
    # The tests' config keeps the real recipe's frozen vision and the tests' tiny model.
    assert load_config(REPO / "configs" / "tiny_cpu.yaml").model.train_vision is False


def test_make_demo_builds_the_demo_model_trains_demo_config_and_ends_with_the_summary():
    cmds = _demo_recipe()
    v = _make_vars()
    steps = [c for c in cmds if " -m data.generate" in c or "make_tiny" in c or "train_lora.py" in c
             or "eval_cer.py" in c or "summary.py" in c]
    assert [s.split(".venv/bin/python ")[-1].split()[0] for s in steps] == [
        "-m", "-m", "train/train_lora.py", "eval/eval_cer.py", "eval/summary.py"]
    assert "--demo" in steps[1] and f"--out {v['DEMO_MODEL']}" in steps[1]
    assert "--config configs/demo_cpu.yaml" in steps[2]
    compare = re.search(r"--out (\S+)", steps[3])[1]
    assert f"--compare {compare}" in steps[4] and f"--data {v['DEMO_DATA']}" in steps[4]
    assert cmds[-1] == steps[4]  # the summary is what a newcomer reads last
    assert all("OMP_NUM_THREADS=" in s for s in steps)  # pinned threads: the same float sums on every machine


def test_demo_geometry_differs_from_the_tests_tiny_model_only_in_widths():
    from dsocr.models.deepseek_ocr_v1.family import tiny_config
    from dsocr.models.make_tiny import DEMO_V1_GEOMETRY

    base = tiny_config()
    assert DEMO_V1_GEOMETRY["hidden_size"] > base.hidden_size
    assert set(DEMO_V1_GEOMETRY) <= {"hidden_size", "intermediate_size", "moe_intermediate_size", "head_dim"}
    assert DEMO_V1_GEOMETRY["head_dim"] == base.head_dim  # attention keeps its width


@pytest.mark.slow
def test_make_demo_v1_writes_a_model_whose_vision_trains_under_the_demo_config(tmp_path, demo_data):
    from dsocr.adapters import add_lora
    from dsocr.loading import load_base
    from dsocr.models.make_tiny import DEMO_V1_GEOMETRY, make_demo_v1

    out = make_demo_v1(tmp_path / "demo_model")
    cfg = load_config(DEMO_CONFIG, [f"model.name_or_path={out}", f"data.dataset={demo_data}",
                                    f"output_dir={tmp_path / 'run'}", "training.report_to=[]"])
    loaded = load_base(cfg, "cpu")
    assert loaded.model.config.hidden_size == DEMO_V1_GEOMETRY["hidden_size"]
    add_lora(loaded)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    for module in loaded.family.vision_module_names:
        assert any(module in n and "modules_to_save" in n for n in trainable), module
    assert any("lora_" in n for n in trainable)


def test_demo_lines_need_few_number_tokens_with_the_real_tokenizer():
    from data import generate as gen
    from dsocr.models.tokenizer import build_offline_tokenizer

    tok = build_offline_tokenizer()
    g = gen.Generator("demo")
    texts = [g.make(0, "train", i)[1] for i in range(300)]
    assert not any(c in "0123456789" for t in texts for c in t)  # full-width digits only
    pieces = {tok.decode([i]) for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]}
    number_tokens = {p for p in pieces if any(c.isdigit() for c in p)}
    # ASCII digits would give ~110 (45.79 -> 45 . 79); full-width ones are single digits plus a few pairs.
    assert len(number_tokens) <= 20, sorted(number_tokens)
