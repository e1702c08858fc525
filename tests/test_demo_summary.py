"""The demo's closing summary and the provenance it prints: font files with hashes, renderer, threads."""

import hashlib
import json

from eval import summary


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _fake_demo(tmp_path):
    """The files eval_cer.py (two --ckpt), train_lora.py and data.generate write, with known figures."""
    refs = ["合计:¥45.79", "12:30", "2021年5月1日", "数量7"]
    hyps = {"base": ["合计合计合计合计", "", "年年年", "1"], "finetuned": ["合计:¥45.79", "12:38", "2021年5月1日", "数量7"]}
    cer = {"base": 1.85, "finetuned": 0.05}
    for name in ("base", "finetuned"):
        _write(tmp_path / "compare" / name / "metrics.json",
               {"cer_raw": cer[name], "cer_norm": cer[name], "line_acc_raw": 0.75 if name == "finetuned" else 0.0,
                "ned_norm": 0.9 if name == "finetuned" else 0.0, "n_lines": 4, "split": "test", "dataset": "runs/demo_data"})
        (tmp_path / "compare" / name / "predictions.jsonl").write_text(
            "".join(json.dumps({"id": i, "reference": r, "hypothesis": h}, ensure_ascii=False) + "\n"
                    for i, (r, h) in enumerate(zip(refs, hyps[name]))), encoding="utf-8")
    _write(tmp_path / "run" / "all_results.json", {"eval_before_cer": 20.5, "eval_cer": 0.07, "eval_before_line_acc": 0.0,
                                                   "eval_line_acc": 0.7, "train_wall_s": 301.2, "global_step": 600})
    _write(tmp_path / "data" / "generation.json",
           {"preset": "demo", "seed": 0, "sizes": {"train": 8}, "fonts": ["A.ttc#2"],
            "font_files": [{"file": "A.ttc", "sha256": "ab" * 32}], "renderer": {"pillow": "13.0.0", "freetype2": "2.14.3"}})
    return [f"--compare={tmp_path / 'compare'}", f"--run={tmp_path / 'run'}", f"--data={tmp_path / 'data'}"]


def test_summary_prints_before_after_examples_fonts_threads_and_report(tmp_path, capsys):
    s = summary.main(_fake_demo(tmp_path))
    out = capsys.readouterr().out
    assert "1.850" in out and "0.050" in out and "75.0%" in out  # test split before -> after
    assert "CER 20.500 -> 0.070" in out  # during training
    assert out.count("'合计:¥45.79'") == 2 and "'12:38' (wrong)" in out and "(ok)" in out
    assert "'数量7'" not in out  # three examples, the first three lines
    assert "A.ttc  sha256 " + "ab" * 32 in out and "FreeType 2.14.3" in out
    assert f"threads on {s['environment']['cpu_count']} CPUs" in out
    assert f"comparison report: {tmp_path / 'compare' / 'report.md'}" in out
    written = json.loads((tmp_path / "compare" / "summary.json").read_text(encoding="utf-8"))
    assert written["test"]["finetuned"]["line_acc"] == 0.75 and len(written["examples"]) == 3
    assert written["environment"]["torch_threads"] >= 1


def test_summary_names_a_missing_file_and_the_fix(tmp_path):
    args = _fake_demo(tmp_path)
    (tmp_path / "run" / "all_results.json").unlink()
    try:
        summary.main(args)
    except SystemExit as e:
        assert "all_results.json does not exist" in str(e) and "make demo" in str(e)
    else:
        raise AssertionError("a missing file must stop the summary with a message")


def test_generation_json_records_font_files_with_sha256_and_renderer(tmp_path):
    from data.generate import generate

    generate(str(tmp_path), {"train": 2, "val": 1, "test": 1}, seed=0, preset="demo")
    g = json.loads((tmp_path / "generation.json").read_text(encoding="utf-8"))
    files = g["font_files"]
    assert files and len({f["file"] for f in files}) == len(files)
    for f in files:
        with open(f["path"], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == f["sha256"]
    assert {f["file"] for f in files} == {name.split("#")[0] for name in g["fonts"]}
    assert g["renderer"]["pillow"] and g["renderer"]["freetype2"]
