"""``bench/full_ft_speed.py --quick``: the GPU bench's own path on CPU (tiny v1), one LoRA and one ZeRO-3 row."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_full_ft_speed_quick_writes_figures_per_run(demo_data, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from bench import full_ft_speed

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = full_ft_speed.main(["--quick", "--data", str(demo_data), "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), "--only", "LoRA", "ZeRO-3"])
    assert not list((tmp_path / "work").glob("*/checkpoint-*"))  # measured, then deleted (disk on the GPU box)
    result = json.loads((tmp_path / "out" / "full_ft_speed.json").read_text())
    assert rc == 0, [r.get("error") for r in result["runs"]]
    names = [r["name"] for r in result["runs"]]
    assert names == ["LoRA (reference)", "full, ZeRO-3", "full, ZeRO-3 + CPU offload"]
    for row in result["runs"]:
        assert row["peak_host_gib"] > 0 and row["checkpoint_gib"] > 0 and len(row["save_s"]) == 2
        assert 0 < row["peak_host_pss_gib"] <= row["peak_host_gib"]  # PSS splits the shared pages
    lora, zero3 = result["runs"][0], result["runs"][1]
    assert zero3["final_gib"] > 10 * lora["final_gib"]  # a whole model (gathered 16-bit weights), not an adapter
    assert "| full, ZeRO-3 |" in (tmp_path / "out" / "full_ft_speed.md").read_text()
