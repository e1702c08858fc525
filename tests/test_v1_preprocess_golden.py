"""DeepSeek-OCR v1 preprocessing vs. goldens produced by the official remote code.

Every entry of ``preprocess.json["entries"]`` (image x mode) is a test case, read from the file, so adding
an entry to the fixture covers it. Pixels must be bit-identical (sha256 of the little-endian float32 bytes):
we call the same PIL resize/pad as the official ``infer()`` and the same float32 arithmetic.
See tests/fixtures/golden/deepseek_ocr_v1/README.md §1–§2 for what each field means.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsocr.models.deepseek_ocr_v1.processing import DeepseekOCRImageProcessor, normalize_pixels

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden" / "deepseek_ocr_v1"
GOLDEN = json.loads((GOLDEN_DIR / "preprocess.json").read_text(encoding="utf-8"))
ENTRIES = GOLDEN["entries"]
TOK = GOLDEN["tokenizer_checks"]
BOS_ID = TOK["bos_eos_pad"][0]
IMAGE_ID = TOK["special_token_ids"]["<image>"]
PROMPT_IDS = TOK["prompt_text_ids"]


def sha256_le_f32(t: torch.Tensor) -> str:
    """sha256 of the contiguous NCHW tensor's raw little-endian float32 bytes (the golden's definition)."""
    return hashlib.sha256(t.contiguous().numpy().astype("<f4", copy=False).tobytes()).hexdigest()


@functools.cache
def load_image(name: str) -> Image.Image:
    return Image.open(GOLDEN_DIR / GOLDEN["images"][name]["file"])


@functools.cache
def processed(key: str):
    """Run our processor once per entry; the tests below share the result."""
    entry = ENTRIES[key]
    image = load_image(entry["image"])
    return DeepseekOCRImageProcessor(entry["mode"])(image)


def assert_stats(ours: torch.Tensor, golden: dict) -> None:
    """Compare every recorded statistic; the sha256 alone would not say *what* differs."""
    assert list(ours.shape) == golden["shape"]
    assert str(ours.dtype).removeprefix("torch.") == golden["dtype"]
    x64 = ours.double()
    # float64 sums of ~1e7 values: accumulation order may differ from the generator's, hence rel 1e-9.
    assert x64.sum().item() == pytest.approx(golden["sum"], rel=1e-9, abs=1e-9)
    assert (x64 * x64).sum().item() == pytest.approx(golden["sum_sq"], rel=1e-9, abs=1e-9)
    assert x64.mean(dim=(0, 2, 3)).tolist() == pytest.approx(golden["channel_mean"], rel=1e-9, abs=1e-12)
    assert ours.min().item() == golden["min"]
    assert ours.max().item() == golden["max"]
    # The samples are float32 values written as exact decimals: compare exactly in float32.
    sample = ours.flatten()[:: golden["sample_stride"]].numpy()
    np.testing.assert_array_equal(sample, np.asarray(golden["sample"], dtype=np.float32))
    assert sha256_le_f32(ours) == golden["sha256_le_f32"]


def test_fixture_covers_all_modes():
    # Guards against an emptied or truncated fixture silently running zero parametrized cases.
    modes = {e["mode"] for e in ENTRIES.values()}
    assert modes == {"tiny", "small", "base", "large", "gundam"}
    assert {e["image"] for e in ENTRIES.values()} == set(GOLDEN["images"])


@pytest.mark.parametrize("name", sorted(GOLDEN["images"]))
def test_image_file_matches_recorded_sha256(name):
    info = GOLDEN["images"][name]
    data = (GOLDEN_DIR / info["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert list(load_image(name).size) == info["size_wh"]


def test_offline_tokenizer_encodes_recorded_prompt_ids():
    from dsocr.models.tokenizer import build_offline_tokenizer

    tok = build_offline_tokenizer()
    assert tok.encode(TOK["prompt_text_after_image"], add_special_tokens=False) == PROMPT_IDS
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert tok.bos_token_id == BOS_ID
    assert GOLDEN["prompt"] == "<image>" + TOK["prompt_text_after_image"]


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_mode_sizes_match_golden(key):
    entry = ENTRIES[key]
    proc = DeepseekOCRImageProcessor(entry["mode"])
    assert (proc.base_size, proc.image_size, proc.crop) == (
        entry["base_size"],
        entry["image_size"],
        entry["crop_mode"],
    )


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_token_layout(key):
    entry = ENTRIES[key]
    out = processed(key)
    n = out.num_image_tokens
    assert n == entry["n_image_tokens"]
    width, height = GOLDEN["images"][entry["image"]]["size_wh"]
    assert DeepseekOCRImageProcessor(entry["mode"]).num_image_tokens(width, height) == n
    # The prompt we would build: [BOS] + image slots + ids("\nFree OCR."), as infer() does.
    ids = [BOS_ID] + [IMAGE_ID] * n + PROMPT_IDS
    assert ids == entry["input_ids"]
    assert [int(i == IMAGE_ID) for i in ids] == entry["images_seq_mask"]
    assert entry["image_token_span"] == [1, 1 + n]
    assert len(ids) == entry["seq_len"]


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_crop_grid(key):
    entry = ENTRIES[key]
    crop = processed(key).tensors["images_spatial_crop"]
    assert crop.dtype == torch.long
    assert crop.tolist() == entry["images_spatial_crop"]
    assert (crop.tolist() != [[1, 1]]) == entry["has_tiles"]


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_global_view_pixels_bit_exact(key):
    assert_stats(normalize_pixels(processed(key).tensors["pixel_values"]), ENTRIES[key]["global_view"])


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_tiles_pixels_bit_exact(key):
    entry = ENTRIES[key]
    golden = entry["tiles"]
    local = normalize_pixels(processed(key).tensors["pixel_values_local"])
    if entry["has_tiles"]:
        assert local.shape[0] == entry["images_spatial_crop"][0][0] * entry["images_spatial_crop"][0][1]
        assert_stats(local, golden)
        return
    # No tiles: the official code passes an all-zero [1, 3, base, base] sentinel; we return P = 0 tiles and
    # leave the sentinel to the model side. Check the golden really is that sentinel.
    assert tuple(local.shape) == (0, 3, 640, 640)
    assert local.dtype == torch.float32
    base = entry["base_size"]
    assert golden["shape"] == [1, 3, base, base]
    assert golden["sum"] == golden["sum_sq"] == golden["min"] == golden["max"] == 0.0
    assert golden["channel_mean"] == [0.0, 0.0, 0.0]
    assert sha256_le_f32(torch.zeros(golden["shape"], dtype=torch.float32)) == golden["sha256_le_f32"]
