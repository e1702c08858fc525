"""data.convert: the conversation format and the skip contract (counted, logged, None)."""

import io
import json

import datasets
import pytest
from PIL import Image

from data.convert import ConversationDataset, to_conversation
from data.images import BadRecordError


def png(size=(40, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def dataset(rows):
    feats = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(decode=False),
            "text": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "id": [r[0] for r in rows],
            "image": [{"bytes": r[1], "path": None} for r in rows],
            "text": [r[2] for r in rows],
        },
        features=feats,
    )


def test_to_conversation_format():
    conv = to_conversation(
        {"id": "train-0", "image": {"bytes": png(mode="RGBA"), "path": None}, "text": " 合计￥12.50 "}
    )
    assert conv["id"] == "train-0"
    user, bot = conv["messages"]
    assert user["role"] == "<|User|>" and user["content"] == "<image>\nFree OCR."
    assert (
        len(user["images"]) == 1
        and isinstance(user["images"][0], Image.Image)
        and user["images"][0].mode == "RGB"
    )
    assert bot == {"role": "<|Assistant|>", "content": "合计￥12.50"}  # stripped
    assert "images" not in bot
    other = to_conversation({"id": "x", "image": Image.new("L", (30, 10)), "text": "a"}, "<image>\nOCR this.")
    assert other["messages"][0]["content"] == "<image>\nOCR this."
    with pytest.raises(ValueError, match="exactly once"):
        to_conversation({"id": "x", "image": png(), "text": "a"}, "Free OCR.")
    with pytest.raises(BadRecordError) as ei:
        to_conversation({"id": "x", "image": png()})
    assert ei.value.reason == "missing_column" and "'text'" in str(ei.value)


def test_error_mode_raises_with_record():
    ds = ConversationDataset(dataset([("a", png(), "好"), ("b", b"junk", "坏")]))
    assert len(ds) == 2 and ds[0]["messages"][1]["content"] == "好"
    with pytest.raises(BadRecordError) as ei:
        ds[1]
    assert ei.value.record_id == "b" and ei.value.reason == "corrupt_image"


def test_skip_mode_counts_logs_and_returns_none(tmp_path):
    log = tmp_path / "logs" / "skipped.jsonl"
    ds = ConversationDataset(
        dataset(
            [
                ("a", png(), "好"),
                ("b", b"junk", "坏"),
                ("c", png(), "   "),
                ("d", png((1, 1)), "小"),
                ("e", png(), "x" * 30),
            ]
        ),
        on_bad_record="skip",
        skipped_log=log,
        max_label_chars=20,
    )
    items = [ds[i] for i in range(len(ds))]
    assert items[0] is not None and items[1:] == [None] * 4
    assert ds.skipped_count == 4
    assert ds.skipped_reasons == {"corrupt_image": 1, "empty_label": 1, "too_small": 1, "label_too_long": 1}
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert [(x["id"], x["reason"]) for x in lines] == [
        ("b", "corrupt_image"),
        ("c", "empty_label"),
        ("d", "too_small"),
        ("e", "label_too_long"),
    ]
    assert all(x["id"] in x["message"] for x in lines)
    ds[1]  # a second epoch: not double counted or logged
    assert ds.skipped_count == 4 and len(log.read_text().splitlines()) == 4


def test_bad_settings():
    ds = dataset([("a", png(), "好")])
    with pytest.raises(ValueError, match="'drop' is not one of"):
        ConversationDataset(ds, on_bad_record="drop")
    with pytest.raises(ValueError, match="only used with on_bad_record='skip'"):
        ConversationDataset(ds, skipped_log="x.jsonl")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['id'\]"):
        ConversationDataset(ds.remove_columns("id"))


def test_skip_log_lines_carry_the_split_and_count_skipped_counts_distinct_records(tmp_path):
    from data import convert  # attribute access: the module's other tests run even without count_skipped

    log = tmp_path / "skipped.jsonl"
    assert convert.count_skipped(log) == {}  # no log yet: nothing skipped
    train = dataset([("a", png(), "好"), ("b", b"junk", "坏"), ("c", png(), " ")])
    val = dataset([("a", b"junk", "坏"), ("v", png(), "好")])  # same id "a" as train, another split
    # two DataLoader "workers" (one dataset copy each) meet the same bad train records
    for _worker in range(2):
        ds = ConversationDataset(train, on_bad_record="skip", skipped_log=log, split="train")
        assert [ds[i] is None for i in range(len(ds))] == [False, True, True]
    # every evaluation re-reads the eval split in a fresh process
    for _evaluation in range(3):
        ds = ConversationDataset(val, on_bad_record="skip", skipped_log=log, split="val")
        assert [ds[i] is None for i in range(len(ds))] == [True, False]
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 * 2 + 3  # one line per record per process
    assert all(set(x) == {"id", "reason", "message", "split"} for x in lines)
    assert [(x["split"], x["id"], x["reason"]) for x in lines[:2]] == [
        ("train", "b", "corrupt_image"),
        ("train", "c", "empty_label"),
    ]
    assert convert.count_skipped(log) == {"train": 2, "val": 1}
    assert convert.count_skipped(str(log)) == {"train": 2, "val": 1}


def test_count_skipped_without_split_and_broken_lines(tmp_path):
    from data import convert

    log = tmp_path / "skipped.jsonl"
    ds = ConversationDataset(dataset([("b", b"junk", "坏")]), on_bad_record="skip", skipped_log=log)
    ds[0]
    assert json.loads(log.read_text(encoding="utf-8"))["split"] is None  # written, not left out
    ds2 = ConversationDataset(dataset([("b", b"junk", "坏")]), on_bad_record="skip", skipped_log=log)
    ds2[0]
    assert convert.count_skipped(log) == {convert.NO_SPLIT: 1}
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"id": "x", "rea')  # a process killed mid-line
    with pytest.raises(ValueError, match=r"skipped\.jsonl:3.*not a skip-log line"):
        convert.count_skipped(log)
