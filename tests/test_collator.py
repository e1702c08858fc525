"""DeepSeekOCRDataCollator: token layout, masks, padding, shapes, and loud failures."""

import pytest
import torch
from PIL import Image

from collator.deepseek_ocr import IGNORE_INDEX, DeepSeekOCRDataCollator
from dsocr.models import get_family
from dsocr.models.tokenizer import build_offline_tokenizer

FREE_OCR_IDS = [201, 21431, 126041, 16]  # "\nFree OCR." (docs/MODEL_NOTES.md §2, golden fixtures)
ANSWER_IDS = [1880, 1418, 29941, 2372, 3255, 21]  # 海信LED46EC3


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


@pytest.fixture(scope="module", params=["deepseek_ocr_v1", "deepseek_ocr2"])
def setup(request, tok, tiny_model_dirs):
    family = get_family(request.param)
    model = family.load_model(str(tiny_model_dirs(request.param)))
    mode = "tiny" if request.param == "deepseek_ocr_v1" else "base"
    return family, model, family.image_processor(model, mode)


def record(text, size=(120, 32), rid="r0", instruction="<image>\nFree OCR."):
    return {"id": rid, "messages": [
        {"role": "<|User|>", "content": instruction, "images": [Image.new("RGB", size, "white")]},
        {"role": "<|Assistant|>", "content": text}]}


def make(setup, tok, **kw):
    family, model, proc = setup
    return DeepSeekOCRDataCollator(tokenizer=tok, family=family, image_processor=proc,
                                   image_token_id=family.image_token_id(model), **kw)


def test_layout_and_labels(setup, tok):
    c = make(setup, tok)
    b = c([record("海信LED46EC3")])
    n = c.encode_record(record("x"))["image"].num_image_tokens
    ids = b["input_ids"][0].tolist()
    assert ids == [0] + [128815] * n + FREE_OCR_IDS + ANSWER_IDS + [1]
    labels = b["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * (1 + n + len(FREE_OCR_IDS)) + ANSWER_IDS + [1]
    assert b["attention_mask"].tolist() == [[1] * len(ids)]
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long


def test_right_padding_and_batch(setup, tok):
    c = make(setup, tok)
    b = c([record("海信LED46EC3", rid="a"), record("物流", rid="b")])
    short = b["input_ids"][1].tolist()
    pad = len(ANSWER_IDS) + 1 - (len(tok.encode("物流", add_special_tokens=False)) + 1)
    assert short[-pad:] == [tok.pad_token_id] * pad
    assert b["labels"][1, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert b["attention_mask"][1, -pad:].tolist() == [0] * pad
    assert b["pixel_values"].shape[0] == 2
    # v1 hands uint8 to the model, which normalises on its device; OCR-2's processor normalises on the host.
    expected = torch.uint8 if setup[0].name == "deepseek_ocr_v1" else torch.float32
    assert b["pixel_values"].dtype == expected


def test_generation_batch_left_pads_prompt_only(setup, tok):
    c = make(setup, tok, train=False)
    batch, ids, refs = c.generation_batch([record("海信", rid="a", size=(30, 30)), record("物流很快", rid="b", size=(900, 40))])
    assert ids == ["a", "b"] and refs == ["海信", "物流很快"]
    assert "labels" not in batch
    assert batch["input_ids"][:, -4:].tolist() == [FREE_OCR_IDS, FREE_OCR_IDS]  # prompts end together
    first_real = batch["attention_mask"].argmax(1)
    for row, start in enumerate(first_real.tolist()):
        assert batch["input_ids"][row, start].item() == 0  # BOS right after the left padding
        assert set(batch["input_ids"][row, :start].tolist()) <= {tok.pad_token_id}


def test_supervised_logits_only_matches_labels(setup, tok):
    c = make(setup, tok, supervised_logits_only=True)
    b = c([record("海信LED46EC3", rid="a"), record("物流", rid="b", size=(900, 40))])
    keep, shift = b["logits_to_keep"], b["shift_labels"]
    assert torch.equal(shift, b["labels"][:, keep + 1])
    # Every supervised target of the full sequence is predicted from a kept position.
    assert int((shift != IGNORE_INDEX).sum()) == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_text_only_row(setup, tok):
    c = make(setup, tok)
    rec = {"id": "t", "messages": [{"role": "<|User|>", "content": "Say hi."}, {"role": "<|Assistant|>", "content": "hi"}]}
    b = c([rec, record("物流")])
    assert (b["input_ids"][0] == 128815).sum() == 0
    assert b["pixel_values"].shape[0] == 1  # only the image row contributes pixels


def test_skipped_records_are_counted_not_hidden(setup, tok):
    c = make(setup, tok)
    b = c([None, record("物流"), None])
    assert b["input_ids"].shape[0] == 1 and c.num_skipped == 2
    with pytest.raises(ValueError, match="every record of this batch of 2 was skipped"):
        c([None, None])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"id": "x", "text": "a"}, "collator expects records with 'messages'"),
        (record("含<image>的标签", rid="lbl"), "record 'lbl'.*contains the image token"),
        (record("a", rid="ins", instruction="Free OCR."), "record 'ins'.*must contain '<image>' exactly once"),
        (record("a", rid="two", instruction="<image><image>"), "record 'two'.*exactly once"),
        ({"id": "num", "messages": [{"content": "<image>\nFree OCR.", "images": [Image.new("RGB", (9, 9))]}, {"content": 5}]},
         "record 'num': the answer must be a string, got int"),
    ],
)
def test_bad_input_fails_loudly(setup, tok, bad, match):
    with pytest.raises((KeyError, ValueError), match=match):
        make(setup, tok)([bad])


def test_max_length_never_truncates(setup, tok):
    c = make(setup, tok, max_length=10)
    with pytest.raises(ValueError, match="record 'long' needs .* tokens > max_length 10"):
        c([record("物流很快", rid="long")])


def test_slot_count_equals_model_features(setup, tok):
    """The model accepts the collator's slot count for several image shapes (its hard check passes)."""
    family, model, _ = setup
    c = make(setup, tok)
    sizes = [(30, 30), (300, 40), (1400, 64), (64, 900)]
    b = c([record("物流", size=s, rid=str(i)) for i, s in enumerate(sizes)])
    with torch.no_grad():
        out = model(**b)
    assert torch.isfinite(out.loss)
    # One slot too few must fail loudly in the model, never be silently dropped.
    b2 = dict(b)
    ids = b2["input_ids"].clone()
    first_slot = (ids[0] == 128815).nonzero()[0, 0]
    ids[0, first_slot] = 201
    b2["input_ids"] = ids
    with pytest.raises(Exception, match=r"(?i)image|token|feature"):
        with torch.no_grad():
            model(**b2)
