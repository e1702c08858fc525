"""bench/infer_gpu.py --quick: the GPU inference benchmark runs end to end on CPU with a tiny model (slow tier)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path):
    from bench import infer_gpu

    results = infer_gpu.main(["--quick", "--out", str(tmp_path), "--workdir", str(tmp_path)])
    saved = json.loads((tmp_path / "infer_gpu.json").read_text())
    assert saved["export"]["shards"] >= 2 and saved["export"]["index"]  # 50 MB shards of the tiny model
    assert saved["lines"]["items"] == 8 and saved["pdf"]["items"] == 2 and saved["lines"]["items_per_s"] > 0
    assert results["lines"]["new_tokens_per_s"] > 0
    md = (tmp_path / "infer_gpu.md").read_text()
    assert "predict PDF pages" in md and "pages/s" in md and "export" in md
