"""Image paths that leave the image root are refused (``path_outside_root``) unless explicitly allowed."""

import io
import json
import os

import datasets
import pytest
from PIL import Image

from data import check
from data.images import open_image
from data.loader import DataSourceError, load_split


def png():
    buf = io.BytesIO()
    Image.new("RGB", (34, 16), "white").save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture
def tree(tmp_path):
    """``man/`` holds the manifest and its images; ``secret/`` lies beside it, outside the root."""
    man, secret = tmp_path / "man", tmp_path / "secret"
    (man / "sub").mkdir(parents=True)
    secret.mkdir()
    (man / "sub" / "in.png").write_bytes(png())
    (secret / "s.png").write_bytes(png())
    return man, secret


def outside_error(source, split="train", **kw):
    with pytest.raises(DataSourceError) as ei:
        load_split(source, split, **kw)
    return ei.value


def test_dotdot_path_refused_with_reason_path_and_fix(tree):
    man, secret = tree
    write_manifest(
        man / "train.jsonl",
        [{"image": "sub/in.png", "text": "好"}, {"image": "../secret/s.png", "text": "秘"}],
    )
    e = outside_error(str(man / "{split}.jsonl"))
    assert e.reason == "path_outside_root"
    assert [(p["id"], p["reason"]) for p in e.problems] == [("train-1", "path_outside_root")]
    msg = e.problems[0]["message"]
    assert "'../secret/s.png'" in msg and repr(os.path.realpath(man)) in msg  # the path and the root
    assert "set image_root to a folder that contains it, or allow_paths_outside_root" in msg
    assert "train.jsonl:2" in msg
    # with a problems list the line is reported and the good one still loads
    problems = []
    ds = load_split(str(man), "train", problems=problems)
    assert ds["id"] == ["train-0"] and [p["reason"] for p in problems] == ["path_outside_root"]


def test_absolute_and_symlinked_paths_outside_refused(tree):
    man, secret = tree
    os.symlink(secret / "s.png", man / "sub" / "link.png")
    os.symlink(secret, man / "linkdir")
    write_manifest(
        man / "train.jsonl",
        [
            {"image": str(secret / "s.png"), "text": "绝"},  # absolute, outside
            {"image": "sub/link.png", "text": "链"},  # a file symlink pointing outside
            {"image": "linkdir/s.png", "text": "目"},  # through a symlinked folder
            {"image": "/etc/passwd", "text": "密"},
            {"image": str(man / "sub" / "in.png"), "text": "内"},  # absolute, inside: fine
        ],
    )
    e = outside_error(str(man))
    assert [(p["id"], p["reason"]) for p in e.problems] == [
        ("train-0", "path_outside_root"),
        ("train-1", "path_outside_root"),
        ("train-2", "path_outside_root"),
        ("train-3", "path_outside_root"),
    ]
    assert "'sub/link.png'" in e.problems[1]["message"] and str(secret) in e.problems[1]["message"]


def test_allowed_with_the_flag(tree):
    man, secret = tree
    os.symlink(secret / "s.png", man / "sub" / "link.png")
    write_manifest(
        man / "train.jsonl",
        [
            {"image": "../secret/s.png", "text": "秘"},
            {"image": "sub/link.png", "text": "链"},
            {"image": str(secret / "s.png"), "text": "绝"},
        ],
    )
    ds = load_split(str(man), "train", allow_paths_outside_root=True)
    assert ds["text"] == ["秘", "链", "绝"]
    assert all(open_image(r["image"], record_id=r["id"]).size == (34, 16) for r in ds)


def test_relative_paths_inside_load_with_the_check_on(tree):
    man, _ = tree
    write_manifest(
        man / "train.jsonl",
        [
            {"image": "sub/in.png", "text": "一"},
            {"image": "./sub/../sub/in.png", "text": "二"},
            {"image": "gone.png", "text": "三"},
        ],
    )
    problems = []
    ds = load_split(str(man), "train", allow_paths_outside_root=False, problems=problems)
    assert problems == []
    assert ds["text"] == ["一", "二", "三"]
    assert ds[0]["image"]["path"] == str(man / "sub" / "in.png")
    assert open_image(ds[1]["image"], record_id="b").size == (34, 16)
    assert ds[2]["image"]["path"] == str(man / "gone.png")  # missing but inside: a per-record error later


def test_image_root_is_the_root_when_given(tree, tmp_path):
    man, secret = tree
    write_manifest(
        man / "train.jsonl", [{"image": "s.png", "text": "一"}, {"image": "../man/sub/in.png", "text": "二"}]
    )
    problems = []
    ds = load_split(str(man), "train", image_root=str(secret), problems=problems)
    assert ds["text"] == ["一"] and ds[0]["image"]["path"] == str(secret / "s.png")
    assert [(p["id"], p["reason"]) for p in problems] == [("train-1", "path_outside_root")]
    assert repr(os.path.realpath(secret)) in problems[0]["message"]


def test_imagefolder_file_name_outside_refused(tree):
    man, secret = tree
    scans = man.parent / "scans"
    (scans / "train").mkdir(parents=True)
    (scans / "train" / "0.png").write_bytes(png())
    write_manifest(
        scans / "train" / "metadata.jsonl",
        [{"file_name": "0.png", "text": "好"}, {"file_name": "../../secret/s.png", "text": "秘"}],
    )
    e = outside_error(str(scans))
    assert [(p["id"], p["reason"]) for p in e.problems] == [("train-1", "path_outside_root")]
    assert "metadata.jsonl:2" in e.problems[0]["message"]
    assert len(load_split(str(scans), "train", allow_paths_outside_root=True)) == 2


def test_parquet_path_column_held_to_image_root(tree, tmp_path):
    man, secret = tree
    pq = tmp_path / "pq"
    (pq / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {
            "image": ["sub/in.png", "../secret/s.png", str(secret / "s.png"), None],
            "text": ["一", "二", "三", "四"],
        }
    ).to_parquet(str(pq / "data" / "train-00000-of-00001.parquet"))
    e = outside_error(str(pq), image_root=str(man))
    assert e.reason == "path_outside_root"
    assert [(p["id"], p["reason"]) for p in e.problems] == [
        ("train-1", "path_outside_root"),
        ("train-2", "path_outside_root"),
    ]
    assert (
        "'../secret/s.png'" in e.problems[0]["message"]
        and "allow_paths_outside_root" in e.problems[0]["message"]
    )
    problems = []
    ds = load_split(str(pq), "train", image_root=str(man), problems=problems)
    assert ds["id"] == ["train-0", "train-3"]  # ids keep their position in the split
    assert ds[0]["image"] == {"bytes": None, "path": str(man / "sub" / "in.png")} and len(problems) == 2
    ok = load_split(str(pq), "train", image_root=str(man), allow_paths_outside_root=True)
    assert ok["id"] == ["train-0", "train-1", "train-2", "train-3"]
    # without image_root there is no root to hold the paths to: kept as written
    assert len(load_split(str(pq), "train")) == 4


def test_check_lists_paths_outside_root(tree, capsys):
    man, secret = tree
    write_manifest(
        man / "train.jsonl",
        [{"image": "sub/in.png", "text": "好"}, {"image": "../secret/s.png", "text": "秘"}],
    )
    assert check.main([str(man)]) == 1
    out = capsys.readouterr().out
    assert "train-1\tpath_outside_root\t" in out and "'../secret/s.png'" in out
    assert "1 ok, 1 bad (path_outside_root: 1)" in out
    assert check.main([str(man), "--allow-paths-outside-root"]) == 0
    assert check.scan(str(man), "train", allow_paths_outside_root=True)["bad"] == []


def test_non_string_image_value_is_held_to_the_root_too(tree, monkeypatch):
    man, secret = tree
    (secret / "5").write_bytes(png())
    monkeypatch.chdir(secret)  # a number becomes the path "5", i.e. ./5: here, outside the root
    write_manifest(man / "train.jsonl", [{"image": 5, "text": "数"}])
    e = outside_error(str(man))
    assert [(p["id"], p["reason"]) for p in e.problems] == [("train-0", "path_outside_root")]
    assert "image path 5 " in e.problems[0]["message"]
