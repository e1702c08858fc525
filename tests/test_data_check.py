"""python -m data.check: every bad record of a seeded dataset is reported, fine conversions are not."""

import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from data import check


def enc(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def fine_images():
    """Unusual but valid inputs: all must pass."""
    exif = Image.Exif()
    exif[0x0112] = 6
    p = Image.new("P", (40, 12), 0)
    p.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    return {
        "cmyk": enc(Image.new("CMYK", (40, 12)), "JPEG"),
        "16bit": enc(Image.fromarray(np.full((12, 40), 40000, dtype=np.uint16))),
        "rgba": enc(Image.new("RGBA", (40, 12), (0, 0, 0, 0))),
        "palette": enc(p),
        "grey": enc(Image.new("L", (40, 12), 200)),
        "exif": enc(Image.new("RGB", (40, 12)), "JPEG", exif=exif.tobytes()),
    }


def bad_parquet(tmp_path):
    good = enc(Image.new("RGB", (60, 20), "white"))
    trunc = enc(Image.effect_noise((80, 30), 40).convert("RGB"))
    rows = [(name, b, "正常") for name, b in fine_images().items()]
    expected = {
        "corrupt": ("corrupt_image", b"garbage"),
        "truncated": ("corrupt_image", trunc[: len(trunc) // 2]),
        "zero": ("empty_image_file", b""),
        "tiny": ("too_small", enc(Image.new("RGB", (1, 1)))),
        "strip": ("extreme_aspect", enc(Image.new("L", (20000, 20), 255))),
        "bomb": ("decompression_bomb", enc(Image.new("1", (6000, 6000), 1))),
    }
    rows += [(rid, data, "文字") for rid, (_, data) in expected.items()]
    labels = {
        "empty": "",
        "blank": "  \u3000 ",
        "long": "字" * 600,
        "none": None,
    }  # 600 > the default limit of 512
    rows += [(rid, good, text) for rid, text in labels.items()]
    expected.update(
        {
            "empty": ("empty_label",),
            "blank": ("empty_label",),
            "long": ("label_too_long",),
            "none": ("empty_label",),
        }
    )
    feats = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(
        {
            "id": [r[0] for r in rows],
            "image": [{"bytes": r[1], "path": None} for r in rows],
            "text": [r[2] for r in rows],
        },
        features=feats,
    )
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    return {rid: v[0] for rid, v in expected.items()}


def test_check_reports_every_bad_record(tmp_path, capsys):
    expected = bad_parquet(tmp_path)
    out = tmp_path / "report.jsonl"
    rc = check.main([str(tmp_path), "--split", "train", "--out", str(out)])
    assert rc == 1
    report = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert {r["id"]: r["reason"] for r in report} == expected  # all of them, and no fine image flagged
    assert all(r["id"] in r["message"] for r in report)
    text = capsys.readouterr().out
    assert "checked 16 records" in text and "6 ok, 10 bad" in text and "empty_label: 3" in text
    assert "strip\textreme_aspect" in text and "20000x20" in text


def test_check_limits_flags_and_clean_exit(tmp_path):
    bad_parquet(tmp_path)
    rc = check.main([str(tmp_path), "--max-samples", "6"])  # only the fine images
    assert rc == 0
    rep = check.scan(str(tmp_path), "train", max_samples=6)
    assert rep == {"total": 6, "ok": 6, "bad": [], "counts": {}}


def test_check_manifest_missing_file_and_column_map(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes(enc(Image.new("RGB", (40, 12))))
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"img": "ok.png", "label": "好"}) + "\n")
        f.write(json.dumps({"img": "gone.png", "label": "缺"}) + "\n")
    rc = check.main([str(tmp_path / "{split}.jsonl"), "--column-map", "image=img,text=label"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "train-1\tmissing_image_file" in out and "gone.png" in out and "1 ok, 1 bad" in out


def test_check_manifest_lines_listed_exit_1_parquet_missing_column_exit_2(tmp_path, capsys):
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"image": "a.png"}) + "\n")
        f.write(json.dumps({"image": "b.png", "text": 3}) + "\n")
    report = tmp_path / "r.jsonl"
    assert check.main([str(tmp_path), "--out", str(report)]) == 1  # malformed lines are bad records
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("train-0", "missing_column"),
        ("train-1", "label_not_string"),
    ]
    assert "train-0\tmissing_column" in capsys.readouterr().out
    # a parquet without the mapped columns
    pq = tmp_path / "pq"
    (pq / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"img": ["x"], "label": ["y"]}).to_parquet(
        str(pq / "data" / "train-00000-of-00001.parquet")
    )
    assert check.main([str(pq)]) == 2
    assert "--column-map image=img,text=label" in capsys.readouterr().err
    assert check.main([str(pq), "--column-map", "image=img,text=label"]) == 1  # "x" is no file -> per record


def one_pass_manifest(tmp_path):
    """One good line, then a bad-JSON line, a line without text, a corrupt image and an empty label."""
    (tmp_path / "ok.png").write_bytes(enc(Image.new("RGB", (40, 12), "white")))
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"image": "ok.png", "text": "好"}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"image": "ok.png"}) + "\n")
        f.write(json.dumps({"image": "corrupt.png", "text": "坏"}) + "\n")
        f.write(json.dumps({"image": "ok.png", "text": "  "}) + "\n")
    return {
        "train-1": "bad_json",
        "train-2": "missing_column",
        "train-3": "corrupt_image",
        "train-4": "empty_label",
    }


def test_check_scan_reports_structural_and_record_problems_in_one_pass(tmp_path):
    expected = one_pass_manifest(tmp_path)
    rep = check.scan(str(tmp_path), "train")
    assert {b["id"]: b["reason"] for b in rep["bad"]} == expected and len(rep["bad"]) == 4
    assert rep["total"] == 5 and rep["ok"] == 1
    assert rep["counts"] == {"bad_json": 1, "missing_column": 1, "corrupt_image": 1, "empty_label": 1}


def test_check_main_reports_structural_and_record_problems_in_one_pass(tmp_path, capsys):
    expected = one_pass_manifest(tmp_path)
    out = tmp_path / "r.jsonl"
    assert check.main([str(tmp_path / "{split}.jsonl"), "--out", str(out)]) == 1
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert {r["id"]: r["reason"] for r in rows} == expected and len(rows) == 4
    text = capsys.readouterr().out
    for rid, reason in expected.items():
        assert f"{rid}\t{reason}\t" in text
    assert "checked 5 records" in text and "1 ok, 4 bad" in text
    assert "bad_json: 1, corrupt_image: 1, empty_label: 1, missing_column: 1" in text


def label_manifest(folder, label):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ok.png").write_bytes(enc(Image.new("RGB", (40, 12), "white")))
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"image": "ok.png", "text": label}, ensure_ascii=False) + "\n")


def test_check_config_limits_are_the_training_limits(tmp_path, capsys):
    label_manifest(tmp_path / "man", "六个字的标签")  # 6 characters
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"output_dir: runs/x\nmodel:\n  family: deepseek_ocr_v1\ndata:\n  dataset: {tmp_path / 'man'}\n"
        "  train_split: train\n  max_label_chars: 5\n",
        encoding="utf-8",
    )
    assert check.main(["--config", str(cfg), "--split", "train"]) == 1  # source from data.dataset
    out = capsys.readouterr().out
    assert "train-0\tlabel_too_long\t" in out and "over the limit of 5" in out
    # without --config the default limit (512) applies
    assert check.main([str(tmp_path / "man")]) == 0
    label_manifest(tmp_path / "long", "字" * 513)
    assert check.main([str(tmp_path / "long")]) == 1
    assert "over the limit of 512" in capsys.readouterr().out
    # an explicit flag wins over the config
    assert check.main(["--config", str(cfg), "--max-label-chars", "6"]) == 0


def test_check_config_takes_every_data_key(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "wide.png").write_bytes(enc(Image.new("RGB", (90, 10), "white")))  # aspect 9:1, 900 pixels
    man = tmp_path / "man"
    man.mkdir()
    with open(man / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"img": "wide.png", "label": "宽"}) + "\n")
        f.write(json.dumps({"img": "../../etc/hostname", "label": "外"}) + "\n")
    base = f"data:\n  dataset: {man}\n  column_map: {{image: img, text: label}}\n  image_root: {imgs}\n"

    def run(extra, *flags):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(base + extra, encoding="utf-8")
        rc = check.main(["--config", str(cfg), *flags])
        return rc, capsys.readouterr().out

    rc, out = run("")  # column_map and image_root from the config; the ../ path is refused
    assert rc == 1 and "train-0" not in out and "train-1\tpath_outside_root" in out
    assert "allow_paths_outside_root" in out
    rc, out = run("  allow_paths_outside_root: true\n  max_image_aspect: 5\n")
    assert "train-0\textreme_aspect" in out and "path_outside_root" not in out
    rc, out = run(
        "  max_image_aspect: 1e1\n  max_image_pixels: 800\n"
    )  # YAML 1.2 float, as training reads it
    assert "train-0\tdecompression_bomb" in out and "800" in out
    rc, out = run("  min_image_side: 11\n")
    assert "train-0\ttoo_small" in out
    rc, out = run("  min_image_side: 11\n", "--min-side", "2", "--allow-paths-outside-root")
    assert "train-0" not in out and "path_outside_root" not in out


def test_check_config_errors(tmp_path, capsys):
    label_manifest(tmp_path / "man", "好")
    cfg = tmp_path / "c.yaml"

    def err(text, *argv):
        if text is not None:
            cfg.write_text(text, encoding="utf-8")
        with pytest.raises(SystemExit) as ei:
            check.main(list(argv) or ["--config", str(cfg)])
        assert ei.value.code == 2
        return capsys.readouterr().err

    assert "give a source" in err(None, "--split", "train")
    assert "does not exist" in err(None, "--config", str(tmp_path / "nope.yaml"))
    assert "data.dataset" in err("data:\n  max_label_chars: 5\n")  # no source anywhere
    msg = err(f"data:\n  dataset: {tmp_path / 'man'}\n  max_label_chars: many\n")
    assert "data.max_label_chars" in msg and "'many'" in msg and "integer" in msg
    msg = err(f"data:\n  dataset: {tmp_path / 'man'}\n  column_map: [image, img]\n")
    assert "data.column_map" in msg and "image: img" in msg
    assert "mapping" in err("- a\n- b\n")
    # an unknown split is still an error (exit 2), whichever way the source came
    cfg.write_text(f"data:\n  dataset: {tmp_path / 'man'}\n", encoding="utf-8")
    assert check.main(["--config", str(cfg), "--split", "val"]) == 2
    assert "unknown_split" in capsys.readouterr().err
