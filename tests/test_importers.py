"""Importers of users' labels (data.importers): PaddleOCR, Label Studio, CSV; bad records named with reasons."""

import json

import pytest
from PIL import Image, ImageDraw

from data import importers
from data.loader import DataSourceError, load_split


def _img(path, size=(120, 32), colour=(255, 255, 255)):
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).rectangle((10, 8, size[0] - 10, size[1] - 8), fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_paddle_label_file_with_bad_records_names_each(tmp_path):
    root = tmp_path / "rec"
    _img(root / "train" / "a.png")
    _img(root / "train" / "b.jpg")
    (root / "train" / "broken.png").write_bytes(b"not an image")
    (root / "rec_gt_train.txt").write_text(
        "train/a.png\t合计￥12.50\n"
        "train/b.jpg\t2024年5月3日\n"
        "train/missing.png\t单号\n"          # missing image file
        "train/a.png 没有制表符\n"             # no tab
        "train/broken.png\t坏图\n"             # corrupt image
        "train/a.png\t   \n"                   # empty label
        "../outside.png\t越界\n"               # path outside the root
        "\n",
        encoding="utf-8",
    )
    out = tmp_path / "ds"
    s = importers.import_labels("paddle", str(root / "rec_gt_train.txt"), str(out), "train")
    assert s["parquet"] is None, "error mode writes nothing when a record is bad"
    got = {(p["where"].rsplit(":", 1)[1], p["reason"]) for p in s["problems"]}
    assert got == {("3", "missing_image_file"), ("4", "bad_line"), ("5", "corrupt_image"), ("6", "empty_label"),
                   ("7", "path_outside_root")}
    assert s["n_records"] == 7

    s = importers.import_labels("paddle", str(root / "rec_gt_train.txt"), str(out), "train", on_bad_record="skip")
    assert s["n_written"] == 2
    assert len(s["problems"]) == 5
    rows = load_split(str(out), "train")
    assert rows["text"] == ["合计￥12.50", "2024年5月3日"]
    assert rows["id"] == ["train-0", "train-1"]
    assert json.loads((out / "import-train.json").read_text(encoding="utf-8"))["reasons"]["bad_line"] == 1


def _ls_task(tid, ref, results, cancelled=False):
    return {"id": tid, "data": {"ocr": ref}, "annotations": [{"was_cancelled": cancelled, "result": results}]}


def _region(rid, x, y, w, h, text, rotation=0):
    geo = {"x": x, "y": y, "width": w, "height": h, "rotation": rotation}
    return [
        {"id": rid, "type": "rectangle", "from_name": "bbox", "to_name": "image", "value": dict(geo),
         "original_width": 200, "original_height": 100},
        {"id": rid, "type": "textarea", "from_name": "transcription", "to_name": "image",
         "value": {**geo, "text": text}, "original_width": 200, "original_height": 100},
    ]


def test_labelstudio_export_crops_regions_and_names_bad_records(tmp_path):
    media = tmp_path / "media"
    _img(media / "upload" / "1" / "page.png", size=(200, 100))
    export = [
        _ls_task(1, "/data/upload/1/page.png",
                 _region("r1", 10, 10, 50, 20, ["合计"]) + _region("r2", 0, 50, 100, 30, ["金额：12.00"])
                 + _region("r3", 10, 10, 20, 10, [""])                       # empty transcription
                 + _region("r4", 90, 90, 30, 30, ["越界"])                   # box leaves the image
                 + _region("r5", 10, 10, 20, 10, ["两行", "文字"])),          # two lines in one region
        _ls_task(2, "/data/upload/1/gone.png", _region("r1", 0, 0, 50, 50, ["找不到"])),   # missing file
        _ls_task(3, "https://example.com/x.png", _region("r1", 0, 0, 50, 50, ["远程"])),   # remote image
        _ls_task(4, "/data/upload/1/page.png", _region("r1", 0, 0, 50, 50, ["取消"]), cancelled=True),
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "ds"
    s = importers.import_labels("labelstudio", str(path), str(out), "val", image_root=str(media),
                                on_bad_record="skip")
    got = {(p["id"], p["reason"]) for p in s["problems"]}
    assert got == {("val-1-r3", "empty_label"), ("val-1-r4", "bad_region"), ("val-1-r5", "multiline_label"),
                   ("val-2-r1", "missing_image_file"), ("val-3-r1", "remote_image"), ("val-4", "no_annotation")}
    rows = load_split(str(out), "val")
    assert rows["id"] == ["val-1-r1", "val-1-r2"]
    assert rows["text"] == ["合计", "金额：12.00"]
    from data.images import open_image

    crop = open_image(rows[0]["image"], record_id="x")
    assert crop.size == (100, 20)  # 50 % x 20 % of 200 x 100


def test_labelstudio_rotated_region_is_cut_along_its_axes(tmp_path):
    # Box corner at (30, 30) rotated 90 deg clockwise: its width runs down the image, its height to the left.
    # A dark bar down from the corner is the crop's top row; the bottom row (10 px left) stays white.
    im = Image.new("RGB", (100, 100), (255, 255, 255))
    ImageDraw.Draw(im).rectangle((29, 30, 31, 50), fill=(0, 0, 0))
    crop = importers._crop(im, {"x": 30, "y": 30, "width": 20, "height": 10, "rotation": 90}, "r")
    assert crop.size == (20, 10)
    assert max(crop.getpixel((u, 0))[0] for u in range(2, 18)) < 100
    assert min(crop.getpixel((u, 9))[0] for u in range(2, 18)) > 200


def test_csv_with_configurable_columns(tmp_path):
    _img(tmp_path / "imgs" / "1.png")
    _img(tmp_path / "imgs" / "2.png")
    (tmp_path / "labels.csv").write_text(
        "\ufeffkey;file;transcription\nk1;imgs/1.png;发票号码12345678\nk2;imgs/2.png;\nk3;imgs/9.png;缺图\n",
        encoding="utf-8")
    out = tmp_path / "ds"
    s = importers.import_labels("csv", str(tmp_path / "labels.csv"), str(out), "test", image_column="file",
                                text_column="transcription", id_column="key", delimiter=";", on_bad_record="skip")
    assert {(p["id"], p["reason"]) for p in s["problems"]} == {("k2", "empty_label"), ("k3", "missing_image_file")}
    rows = load_split(str(out), "test")
    assert rows["id"] == ["k1"]
    with pytest.raises(DataSourceError, match="no column"):
        importers.import_labels("csv", str(tmp_path / "labels.csv"), str(out), "test")


def test_cli_exit_status_and_listing(tmp_path, capsys):
    _img(tmp_path / "a.png")
    (tmp_path / "gt.txt").write_text("a.png\t好\nb.png\t缺\n", encoding="utf-8")
    rc = importers.main(["paddle", str(tmp_path / "gt.txt"), "--out", str(tmp_path / "ds"), "--split", "train"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "train-1" in cap.out
    assert "missing_image_file" in cap.out
    assert not (tmp_path / "ds" / "data").exists()
    assert importers.main(["paddle", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "ds"), "--split", "x"]) == 2
