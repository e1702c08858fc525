"""Evaluation by tag: metrics_by_tag, eval_cer's per-tag files and console table, the report's per-tag section."""

import json

import pytest

from dsocr.metrics import NormalizeConfig, metrics_by_tag, score_lines
from dsocr.report import write_comparison_report

REFS = ["合计12.00", "发票号码123", "设置", "每日3次"]
HYPS = ["合计12.00", "发票号码128", "没置", "每日3次"]
TAGS = [
    {"domain": "receipt", "level": "hard", "degradations": "blur+noise", "length": "6-10"},
    {"domain": "invoice", "level": "clean", "degradations": "none", "length": "6-10"},
    {"domain": "screenshot", "level": "mild", "degradations": "blur", "length": "1-5"},
    {"domain": "medical", "level": "hard", "degradations": "noise", "length": "1-5"},
]


def _score(hyps=HYPS):
    return score_lines(REFS, hyps, normalize_cfg=NormalizeConfig())


def test_metrics_by_tag_groups_lines_and_splits_degradations():
    _, per_line = _score()
    by = metrics_by_tag(per_line, TAGS)
    assert list(by) == ["domain", "level", "degradations", "length"]
    assert list(by["level"]) == ["clean", "mild", "hard"], "levels in their natural order"
    assert by["domain"]["invoice"]["cer_norm"] == pytest.approx(1 / 7)
    assert by["domain"]["receipt"]["cer_norm"] == 0.0
    assert by["domain"]["screenshot"]["line_acc_norm"] == 0.0
    assert by["level"]["hard"]["n_lines"] == 2
    assert by["degradations"]["blur"]["n_lines"] == 2  # receipt (blur+noise) and screenshot (blur)
    assert by["degradations"]["noise"]["n_lines"] == 2
    assert by["degradations"]["blur"]["cer_norm"] == pytest.approx(1 / (7 + 2))
    assert by["domain"]["screenshot"]["error_kinds"]["substitution_only"] == 1


def test_lines_without_tags_are_left_out_of_groups():
    _, per_line = _score()
    by = metrics_by_tag(per_line, [TAGS[0], None, None, None])
    assert by["domain"] == {"receipt": by["domain"]["receipt"]}
    with pytest.raises(ValueError, match="differ in length"):
        metrics_by_tag(per_line, TAGS[:2])


def _run(name, hyps):
    corpus, per_line = _score(hyps)
    for i, pl in enumerate(per_line):
        pl["id"] = f"l{i}"
        pl["tags"] = TAGS[i]
    corpus["by_tag"] = metrics_by_tag(per_line, TAGS)
    return name, corpus, per_line


def test_report_has_per_tag_tables_plot_and_change(tmp_path):
    base = _run("base", ["合计12.00", "发票号码128", "没置", "每日8次"])
    lora = _run("lora", ["合计12.00", "发票号码123", "没置", "每日3次"])
    report = write_comparison_report([base, lora], tmp_path)
    md = report.read_text(encoding="utf-8")
    assert "## Metrics per tag" in md
    assert "### By domain" in md
    assert "### By degradations" in md
    invoice = next(line for line in md.splitlines() if line.startswith("| invoice |"))
    assert invoice.split(" | ")[-1].strip(" |") == f"{-1 / 7:+.4f}", invoice  # the fine-tune fixed invoices
    assert (tmp_path / "cer_by_tag.png").stat().st_size > 1000
    assert "cer_by_tag.png" in md


def test_report_without_tags_has_no_tag_section(tmp_path):
    name, corpus, per_line = _run("a", HYPS)
    corpus.pop("by_tag")
    md = write_comparison_report([(name, corpus, per_line), ("b", corpus, per_line)], tmp_path).read_text("utf-8")
    assert "Metrics per tag" not in md
    assert not (tmp_path / "cer_by_tag.png").exists()


def test_eval_cer_peers_alone_on_a_tagged_set_write_per_tag_metrics(tmp_path, monkeypatch, capsys):
    from data import hardset

    try:
        hardset.build(str(tmp_path / "hard"), per_cell=1)
    except RuntimeError as e:  # no CJK fonts here
        pytest.skip(str(e))
    import dsocr.peers
    from eval import eval_cer

    # Stand-in engines (no OCR engine needed): one reads every line right, one drops the last character.
    def fake(engine, images):
        assert len(images) == len(fake.refs)
        return list(fake.refs) if engine == "rapidocr" else [r[:-1] for r in fake.refs]

    import datasets

    fake.refs = datasets.load_dataset(str(tmp_path / "hard"))["test"]["text"]
    monkeypatch.setattr(dsocr.peers, "recognize_lines", fake)
    out = tmp_path / "peers"
    eval_cer.main(["--peer", "rapidocr", "--peer", "tesseract", "--config", "configs/tiny_cpu.yaml",
                   f"data.dataset={tmp_path / 'hard'}", "eval.split=test", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "tesseract by domain:" in printed
    metrics = json.loads((out / "rapidocr" / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["by_tag"]["domain"]) == {"receipt", "invoice", "medical", "screenshot"}
    assert metrics["by_tag"]["level"]["hard"]["cer_norm"] == 0.0
    by_file = json.loads((out / "tesseract" / "metrics_by_tag.json").read_text(encoding="utf-8"))
    assert by_file["domain"]["receipt"]["line_acc_norm"] == 0.0
    first = json.loads((out / "tesseract" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["tags"]["domain"] == "receipt"
    assert "### By domain" in (out / "report.md").read_text(encoding="utf-8")
