"""data.loader: one call for every format; column_map, max_samples, clear errors."""

import io
import json

import datasets
import pytest
from PIL import Image

from data.generate import generate
from data.images import open_image
from data.loader import DataSourceError, load_split


def png(text_len=3):
    buf = io.BytesIO()
    Image.new("RGB", (10 * text_len + 4, 16), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), {"train": 12, "val": 5, "test": 4}, seed=3, preset="demo")
    return str(out)


def assert_schema(ds):
    assert ds.column_names == ["id", "image", "text"]
    assert ds.features["image"] == datasets.Image(decode=False)


def test_parquet_folder_like_the_hub(synth):
    for split, n in (("train", 12), ("val", 5), ("test", 4)):
        ds = load_split(synth, split)
        assert_schema(ds)
        assert len(ds) == n and ds[0]["id"] == f"{split}-0"
        rec = ds[1]
        assert (
            isinstance(rec["image"]["bytes"], bytes) and rec["image"]["path"] is None
        )  # embedded, undecoded
        assert open_image(rec["image"], record_id=rec["id"]).mode == "RGB"
    assert len(load_split(synth, "train", max_samples=3)) == 3


def test_parquet_column_map_and_own_ids(tmp_path):
    feats = datasets.Features(
        {"img": datasets.Image(), "label": datasets.Value("string"), "key": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": png(), "path": None}] * 3, "label": ["一", "二", "三"], "key": [7, 8, 9]},
        features=feats,
    )
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    out = load_split(str(tmp_path), "train", column_map={"image": "img", "text": "label", "id": "key"})
    assert_schema(out)
    assert out["id"] == ["7", "8", "9"] and out["text"] == ["一", "二", "三"]
    with pytest.raises(DataSourceError) as ei:
        load_split(str(tmp_path), "train")
    msg = str(ei.value)
    assert (
        ei.value.reason == "missing_column"
        and "'image'" in msg
        and "['img', 'label', 'key']" in msg
        and "column_map" in msg
    )
    with pytest.raises(DataSourceError, match="bad_column_map.*'label'"):
        load_split(str(tmp_path), "train", column_map={"label": "text"})


def test_unknown_split_lists_available(synth):
    with pytest.raises(DataSourceError) as ei:
        load_split(synth, "validation")
    assert ei.value.reason == "unknown_split"
    assert "'validation'" in str(ei.value) and "['test', 'train', 'val']" in str(ei.value)


def write_manifest(folder, name, rows):
    with open(folder / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def test_jsonl_manifest_template_and_folder(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png())
    (imgs / "b.png").write_bytes(png())
    man = tmp_path / "man"
    man.mkdir()
    write_manifest(
        man,
        "train.jsonl",
        [{"image": "a.png", "text": "合计"}, {"image": str(imgs / "b.png"), "text": "金额", "id": "b"}],
    )
    write_manifest(man, "val.jsonl", [{"img": "a.png", "label": "年"}])
    ds = load_split(str(man / "{split}.jsonl"), "train", image_root=str(imgs))
    assert_schema(ds)
    assert ds["id"] == ["train-0", "b"] and ds["text"] == ["合计", "金额"]
    assert ds[0]["image"]["path"] == str(imgs / "a.png")  # resolved against image_root
    assert ds[1]["image"]["path"] == str(imgs / "b.png")  # absolute kept
    assert open_image(ds[0]["image"], record_id="x").size == (34, 16)
    # folder form + column_map; relative paths default to the manifest's folder (here: missing -> per record)
    val = load_split(str(man), "val", column_map={"image": "img", "text": "label"})
    assert val[0]["image"]["path"] == str(man / "a.png")
    assert len(load_split(str(man), "train", max_samples=1, image_root=str(imgs))) == 1
    with pytest.raises(DataSourceError, match=r"unknown_split.*'test'.*\['train', 'val'\]"):
        load_split(str(man), "test")
    with pytest.raises(DataSourceError, match=r"unknown_split.*\['train', 'val'\]"):
        load_split(str(man / "{split}.jsonl"), "test")


def test_jsonl_structural_problems_reported_together(tmp_path):
    write_manifest(
        tmp_path,
        "train.jsonl",
        [
            {"image": "a.png"},
            "{not json",
            {"image": "b.png", "text": 5},
            [1],
            {"image": "c.png", "text": "ok"},
        ],
    )
    with pytest.raises(DataSourceError) as ei:
        load_split(str(tmp_path / "{split}.jsonl"), "train")
    e = ei.value
    assert [(p["id"], p["reason"]) for p in e.problems] == [
        ("train-0", "missing_column"),
        ("train-1", "bad_json"),
        ("train-2", "label_not_string"),
        ("train-3", "bad_json"),
    ]
    assert "4 malformed record(s)" in str(e) and "['text']" in str(e) and "train.jsonl:3" in str(e)


def test_imagefolder_jsonl_and_csv(tmp_path):
    root = tmp_path / "scans"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train" / "0.png").write_bytes(png())
    (root / "test" / "1.png").write_bytes(png())
    write_manifest(root / "train", "metadata.jsonl", [{"file_name": "0.png", "text": "2024年5月3日"}])
    (root / "test" / "metadata.csv").write_text("file_name,text\n1.png,¥12.50\n", encoding="utf-8")
    tr = load_split(str(root), "train")
    assert_schema(tr)
    assert tr[0]["text"] == "2024年5月3日" and tr[0]["image"]["path"] == str(root / "train" / "0.png")
    te = load_split(str(root), "test")
    assert te[0]["text"] == "¥12.50" and open_image(te[0]["image"], record_id="t").mode == "RGB"
    with pytest.raises(DataSourceError, match=r"\['test', 'train'\]"):
        load_split(str(root), "val")


def test_missing_source_and_file_source(tmp_path):
    with pytest.raises(DataSourceError, match="source_not_found.*does not exist"):
        load_split(str(tmp_path / "nothing"), "train")
    with pytest.raises(DataSourceError, match="source_not_found.*does not exist"):
        load_split(str(tmp_path / "m" / "{split}.jsonl"), "train")
    f = tmp_path / "train.jsonl"
    f.write_text("")
    with pytest.raises(DataSourceError, match=r"is a file.*\{split\}"):
        load_split(str(f), "train")


def test_hub_unreachable_is_explained(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of 25 s of retries
    with pytest.raises(DataSourceError) as ei:
        load_split("priyank-m/chinese_text_recognition", "train")
    msg = str(ei.value)
    assert ei.value.reason == "hub_unreachable"
    assert "priyank-m/chinese_text_recognition" in msg and "local copy" in msg and "data.generate" in msg


def test_parquet_path_strings_resolve_against_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"image": ["a.png"], "text": ["字"]}).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet")
    )
    ds = load_split(str(tmp_path), "train", image_root=str(tmp_path / "imgs"))
    assert_schema(ds)
    assert ds[0]["image"] == {"bytes": None, "path": str(tmp_path / "imgs" / "a.png")}
    assert open_image(ds[0]["image"], record_id="a").size == (34, 16)


def test_problems_list_collects_malformed_lines_and_loads_the_rest(tmp_path):
    write_manifest(
        tmp_path,
        "train.jsonl",
        [
            {"image": "a.png"},
            "{not json",
            {"image": "b.png", "text": 5},
            [1],
            {"image": "c.png", "text": "ok", "id": "c"},
        ],
    )
    problems = []
    ds = load_split(str(tmp_path / "{split}.jsonl"), "train", problems=problems)
    assert_schema(ds)
    assert ds["id"] == ["c"] and ds["text"] == ["ok"] and ds[0]["image"]["path"] == str(tmp_path / "c.png")
    assert [(p["id"], p["reason"]) for p in problems] == [
        ("train-0", "missing_column"),
        ("train-1", "bad_json"),
        ("train-2", "label_not_string"),
        ("train-3", "bad_json"),
    ]
    assert all(set(p) == {"id", "reason", "message"} for p in problems)
    assert "train.jsonl:1" in problems[0]["message"] and "['text']" in problems[0]["message"]
    # whole-source problems still raise, even with a list
    with pytest.raises(DataSourceError, match="unknown_split"):
        load_split(str(tmp_path / "{split}.jsonl"), "val", problems=[])
    # a list that already holds entries is appended to, not replaced
    more = [{"id": "x", "reason": "earlier", "message": "kept"}]
    load_split(str(tmp_path), "train", problems=more)
    assert len(more) == 5 and more[0]["reason"] == "earlier"


def test_problems_list_with_only_malformed_lines_gives_an_empty_split(tmp_path):
    write_manifest(tmp_path, "train.jsonl", ["{not json", {"text": "no image"}])
    problems = []
    ds = load_split(str(tmp_path), "train", problems=problems)
    assert_schema(ds)
    assert len(ds) == 0 and [p["reason"] for p in problems] == ["bad_json", "missing_column"]
