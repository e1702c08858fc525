"""write_comparison_report on three small synthetic runs: sections, numbers, PNGs that open."""

import warnings

import pytest
from PIL import Image

from dsocr.metrics import NormalizeConfig, score_lines
from dsocr.report import find_cjk_font, write_comparison_report

REFS = ["海信LED46EC3发票金额", "物流很快", "他很瘦", "今天天气很好", "点心", "你好"]
IDS = [f"line-{i}" for i in range(len(REFS))]
HYPS = {
    # base: a loop, a prompt echo, a shape confusion
    "base": [
        "海信LED46EC3发要金额额",
        "物流快",
        "他很廋",
        "今天天气很好很好很好很好",
        "典心",
        "图片内容是：你好",
    ],
    # lora: fixes most, breaks line-1 (order error)
    "lora": ["海信LED46EC3发票金额", "很快物流", "他很瘦", "今天天气很好", "典心", "你好"],
    # peer: unchanged except one line
    "peer": [
        "海信LED46EC3发要金额额",
        "物流快",
        "他很廋",
        "今天天气很好很好很好很好",
        "点心",
        "图片内容是：你好",
    ],
}


def _run(name, order=None):
    corpus, lines = score_lines(REFS, HYPS[name], normalize_cfg=NormalizeConfig())
    for i, pl in zip(IDS, lines, strict=True):
        pl["id"] = i
    if order is not None:
        lines = [lines[j] for j in order]
    return name, corpus, lines


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # The peer's lines in another order: the report aligns by id.
    runs = [_run("base"), _run("lora"), _run("peer", order=[5, 4, 3, 2, 1, 0])]
    path = write_comparison_report(runs, out / "cmp", n_examples=3)
    return path, runs


def test_report_sections_and_numbers(report):
    path, runs = report
    assert path.name == "report.md" and path.exists()
    md = path.read_text(encoding="utf-8")
    for section in (
        "## Corpus metrics",
        "## Error kinds",
        "## Top confusion pairs",
        "## What got better and what got worse",
        "## Plots",
    ):
        assert section in md
    assert "| metric | base | lora | peer |" in md
    base, lora, peer = (c for _, c, _ in runs)
    # Corpus CERs appear with 4 decimals, one column per run.
    row = next(line for line in md.splitlines() if line.startswith("| CER norm |"))
    assert row == f"| CER norm | {base['cer_norm']:.4f} | {lora['cer_norm']:.4f} | {peer['cer_norm']:.4f} |"
    assert lora["cer_norm"] == pytest.approx(5 / 31)  # 4 (order) + 1 (点→典) over 14+4+3+6+2+2 chars
    assert "| repetition_loop | 1 (16.7%) | 0 (0.0%) | 1 (16.7%) |" in md
    assert "| prompt_echo | 1 (16.7%) | 0 (0.0%) | 1 (16.7%) |" in md
    assert "| order_error | 0 (0.0%) | 1 (16.7%) | 0 (0.0%) |" in md
    assert "**base**: 点→典 ×1, 瘦→廋 ×1, 票→要 ×1" in md
    assert "**lora**: 点→典 ×1" in md
    # Better/worse of lora vs base: 4 better (lines 0, 2, 3, 5), 1 worse (line 1), 1 unchanged (line 4).
    assert "### lora vs base" in md and "**4 better**, **1 worse**, 1 unchanged" in md
    assert "| line-1 | 物流很快 | 物流快 | 很快物流 | 0.250 → 1.000 | +0.750 |" in md
    # Largest decrease first: the loop line (1.0 → 0), then the echo line (3.0 → 0 is larger!).
    better = md.split("### lora vs base")[1].split("Got better")[1].split("### peer")[0]
    assert better.index("line-5") < better.index("line-3")  # Δ −3.0 before Δ −1.0
    assert better.count("| line-") == 3  # n_examples
    assert "### peer vs base" in md and "**1 better**, **0 worse**, 5 unchanged" in md
    for png in ("cer_hist.png", "cer_by_length.png", "error_kinds.png", "confusion_pairs.png"):
        assert f"]({png})" in md


def test_pngs_open(report):
    path, _ = report
    for png in ("cer_hist.png", "cer_by_length.png", "error_kinds.png", "confusion_pairs.png"):
        f = path.parent / png
        assert f.stat().st_size > 0
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_cjk_font_found():
    # fonts-noto-cjk is installed on our machines; elsewhere the report still renders (with a warning).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        font = find_cjk_font()
    if font is None:
        pytest.skip("no CJK font installed")
    assert "CJK" in font or "Hei" in font or "WenKai" in font or "Ming" in font


def test_single_run_and_errors(tmp_path):
    path = write_comparison_report([_run("base")], tmp_path)
    md = path.read_text(encoding="utf-8")
    assert "## Corpus metrics" in md and "What got better" not in md
    with pytest.raises(ValueError, match="not on the same lines"):
        name, c, lines = _run("lora")
        write_comparison_report([_run("base"), (name, c, lines[:-1])], tmp_path)
    with pytest.raises(ValueError, match="unique"):
        write_comparison_report([_run("base"), _run("base")], tmp_path)
    _, c, lines = _run("base")
    with pytest.raises(ValueError, match="needs an 'id'"):
        write_comparison_report(
            [("x", c, [{k: v for k, v in pl.items() if k != "id"} for pl in lines])], tmp_path
        )
