"""python -m data.check: every bad record of a seeded dataset is reported, fine conversions are not."""

import io
import json

import datasets
import numpy as np
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
    labels = {"empty": "", "blank": "  \u3000 ", "long": "字" * 300, "none": None}
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


def test_check_structural_problems_exit_2(tmp_path, capsys):
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"image": "a.png"}) + "\n")
        f.write(json.dumps({"image": "b.png", "text": 3}) + "\n")
    report = tmp_path / "r.jsonl"
    assert check.main([str(tmp_path), "--out", str(report)]) == 2
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("train-0", "missing_column"),
        ("train-1", "label_not_string"),
    ]
    assert "missing_column" in capsys.readouterr().err
    # a parquet without the mapped columns
    pq = tmp_path / "pq"
    (pq / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"img": ["x"], "label": ["y"]}).to_parquet(
        str(pq / "data" / "train-00000-of-00001.parquet")
    )
    assert check.main([str(pq)]) == 2
    assert "--column-map image=img,text=label" in capsys.readouterr().err
    assert check.main([str(pq), "--column-map", "image=img,text=label"]) == 1  # "x" is no file -> per record
