"""Unit tests of DeepSeek-OCR v1 preprocessing on hand-built images (docs/MODEL_NOTES.md §3).

The bit-exact comparison with the official code lives in test_v1_preprocess_golden.py; these tests pin the
rules (token counts, tiling, letterbox geometry, value range) on sizes the goldens do not cover.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from dsocr.models.base import ImageInputs
from dsocr.models.deepseek_ocr_v1.processing import (
    PAD_COLOR,
    TILE_SIZE,
    V1_MODES,
    DeepseekOCRImageProcessor,
    normalize_pixels,
    tile_grid_candidates,
)

# Global view + newlines + separator = n (n + 1) + 1, n = size / 64 (docs/MODEL_NOTES.md §3).
GLOBAL_TOKENS = {"tiny": 73, "small": 111, "base": 273, "large": 421, "gundam": 273}


def tokens_for(mode: str, width: int, height: int) -> int:
    return DeepseekOCRImageProcessor(mode).num_image_tokens(width, height)


def test_mode_table():
    assert V1_MODES == {
        "tiny": (512, 512, False),
        "small": (640, 640, False),
        "base": (1024, 1024, False),
        "large": (1280, 1280, False),
        "gundam": (1024, 640, True),
    }
    assert V1_MODES["gundam"].base_size == 1024 and V1_MODES["gundam"].crop
    assert PAD_COLOR == (127, 127, 127)  # int(0.5 * 255) truncates


@pytest.mark.parametrize("mode", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("size", [(1, 1), (300, 48), (640, 640), (1500, 500), (4000, 3000), (20000, 20)])
def test_non_crop_modes_have_a_fixed_count_and_no_tiles(mode, size):
    proc = DeepseekOCRImageProcessor(mode)
    assert proc.num_image_tokens(*size) == GLOBAL_TOKENS[mode]
    assert proc.tile_grid(*size) == (1, 1)


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [
        ((300, 48), (1, 1), 273),  # both sides <= 640: no tiles
        ((640, 640), (1, 1), 273),  # the threshold is "> 640", so 640 itself does not tile
        ((640, 100), (1, 1), 273),
        ((641, 640), (2, 2), 273 + 21 * 20),  # one pixel more: 4 tiles (aspect ~1, (1,1) is no candidate)
        ((1500, 500), (3, 1), 583),  # docs/MODEL_NOTES.md §3, verified on the official code: 273 + 31 * 10
        ((500, 1500), (1, 3), 273 + 11 * 30),
        ((1400, 64), (9, 1), 1183),  # a long text line (golden line_wide): aspect > 9 -> 9 tiles
        ((1280, 640), (2, 1), 273 + 21 * 10),  # aspect 2 exactly; area below the (4,2) tie threshold
        # Same aspect, area 2,000,000 > 0.5 * 640^2 * 8: the exact tie with the later (4,2) picks 8 tiles.
        ((2000, 1000), (4, 2), 273 + 41 * 20),
    ],
)
def test_gundam_counts(size, grid, tokens):
    proc = DeepseekOCRImageProcessor("gundam")
    assert proc.tile_grid(*size) == grid
    assert proc.num_image_tokens(*size) == tokens


def test_tile_grid_candidates_in_official_order():
    # docs/MODEL_NOTES.md §3 (the official set, sorted by tile count; same on CPython 3.8-3.13).
    expected = [
        (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
        (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1),
    ]  # fmt: skip
    assert tile_grid_candidates() == expected
    assert DeepseekOCRImageProcessor("gundam").candidates == expected
    # Other limits: every grid with min <= i*j <= max, once, by ascending tile count.
    six = tile_grid_candidates(2, 6)
    assert sorted(six) == sorted({(i, j) for i in range(1, 7) for j in range(1, 7) if 2 <= i * j <= 6})
    assert [i * j for i, j in six] == sorted(i * j for i, j in six)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # Aspect exactly 1.25: (2,2) and (3,2) are both 0.25 away (exact in binary floating point), and so is
        # (3,3). The first closest wins unless the image area exceeds half the later grid's area:
        # 0.5 * 640^2 * 6 = 1,228,800 for (3,2), 0.5 * 640^2 * 9 = 1,843,200 for (3,3).
        ((1200, 960), (2, 2)),  # area 1,152,000: below both
        ((1250, 1000), (3, 2)),  # area 1,250,000: above 1,228,800 only
        ((1600, 1280), (3, 3)),  # area 2,048,000: above both; (3,3) comes last in the order
        # Square: (2,2) and (3,3) both match exactly.
        ((1000, 1000), (2, 2)),  # 1,000,000 < 1,843,200
        ((1400, 1400), (3, 3)),  # 1,960,000 > 1,843,200
    ],
)
def test_gundam_exact_tie_rule(size, grid):
    assert DeepseekOCRImageProcessor("gundam").tile_grid(*size) == grid


def test_sizes_come_from_the_arguments():
    # Halving the downsampling doubles the grid side: n = (1024 // 16) / 2 = 32, tile side (640 // 16) / 2 = 20.
    proc = DeepseekOCRImageProcessor("gundam", patch_size=16, downsample_ratio=2)
    assert (proc.n_global, proc.n_tile) == (32, 20)
    assert proc.num_image_tokens(1500, 500) == 32 * 33 + 1 + (20 * 3 + 1) * 20
    # max_tiles limits the candidates: a 1400x64 line gets 6 tiles instead of 9 (DeepSeek's vLLM setting).
    assert DeepseekOCRImageProcessor("gundam", max_tiles=6).tile_grid(1400, 64) == (6, 1)


def test_unknown_mode_error_names_value_and_valid_modes():
    with pytest.raises(ValueError, match=r"'gundum' is not one of tiny, small, base, large, gundam"):
        DeepseekOCRImageProcessor("gundum")


def test_bad_arguments_are_all_reported():
    with pytest.raises(
        ValueError, match=r"patch_size 0 .*; need 1 <= min_tiles <= max_tiles, got min_tiles 5"
    ):
        DeepseekOCRImageProcessor("base", patch_size=0, min_tiles=5, max_tiles=2)
    with pytest.raises(ValueError, match="at least 1x1"):
        DeepseekOCRImageProcessor("gundam").num_image_tokens(0, 10)


def pad_value() -> float:
    """Normalised value of the grey pad colour, computed like the pixels (float32)."""
    return ((torch.tensor(float(PAD_COLOR[0])) / 255 - 0.5) / 0.5).item()


def test_letterbox_geometry_base():
    # 400x120 in base: height round(120 / 400 * 1024) = 307, pasted at y = round((1024 - 307) / 2) = 358
    # (Python rounds 358.5 to even). A white image stays exactly white under bicubic, so rows tell all.
    out = DeepseekOCRImageProcessor("base")(Image.new("RGB", (400, 120), (255, 255, 255)))
    pv = normalize_pixels(out.tensors["pixel_values"])
    assert pv.shape == (1, 3, 1024, 1024)
    white_rows = (pv == 1.0).all(dim=3).all(dim=1)[0]  # [1024] bool
    grey_rows = (pv == pad_value()).all(dim=3).all(dim=1)[0]
    assert white_rows.nonzero().flatten().tolist() == list(range(358, 358 + 307))
    assert (white_rows | grey_rows).all()


def test_squash_modes_lose_the_aspect_ratio():
    # tiny/small stretch the image over the whole square: no pad colour anywhere.
    for mode, side in (("tiny", 512), ("small", 640)):
        pv = normalize_pixels(DeepseekOCRImageProcessor(mode)(Image.new("RGB", (400, 120), (255, 255, 255))).tensors[
            "pixel_values"
        ])
        assert pv.shape == (1, 3, side, side)
        assert (pv == 1.0).all()


def test_tiles_are_row_major():
    # 1280x1280 -> grid (2,2) (exact, area below the (3,3) tie threshold); resize to 1280x1280 is identity,
    # so each tile is exactly one coloured quadrant: top-left, top-right, bottom-left, bottom-right.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    image = Image.new("RGB", (1280, 1280))
    for k, colour in enumerate(colours):
        x, y = (k % 2) * TILE_SIZE, (k // 2) * TILE_SIZE
        image.paste(colour, (x, y, x + TILE_SIZE, y + TILE_SIZE))
    out = DeepseekOCRImageProcessor("gundam")(image)
    local = normalize_pixels(out.tensors["pixel_values_local"])
    assert out.tensors["images_spatial_crop"].tolist() == [[2, 2]]
    assert local.shape == (4, 3, 640, 640)
    for k, colour in enumerate(colours):
        expected = torch.tensor([c / 255 * 2 - 1 for c in colour]).view(3, 1, 1).expand(3, 640, 640)
        assert torch.equal(local[k], expected), f"tile {k}"


def test_pixels_leave_uint8_and_normalize_to_the_unit_range():
    # uint8 out of the processor (a quarter of float32's bytes to copy to the GPU); pure black and white
    # map exactly to -1 and 1 under normalize_pixels, everything stays inside.
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (700, 900, 3), dtype=torch.uint8, generator=g).numpy()
    noise[0, 0] = 0
    noise[0, 1] = 255
    out = DeepseekOCRImageProcessor("gundam")(Image.fromarray(noise))
    for key in ("pixel_values", "pixel_values_local"):
        raw = out.tensors[key]
        assert raw.dtype == torch.uint8
        assert raw.is_contiguous()
        t = normalize_pixels(raw)
        assert t.dtype == torch.float32
        assert t.min().item() == -1.0
        assert t.max().item() == 1.0
    assert out.tensors["images_spatial_crop"].dtype == torch.long


def test_non_rgb_and_exif_are_handled():
    proc = DeepseekOCRImageProcessor("gundam")
    rgb = Image.new("RGB", (700, 100), (10, 200, 30))
    for mode in ("L", "RGBA", "P", "CMYK"):
        img = rgb.convert(mode)
        got, ref = proc(img).tensors, proc(img.convert("RGB")).tensors
        assert all(torch.equal(got[k], ref[k]) for k in ref), mode
    # Orientation 6 (rotate 90 degrees clockwise to display): the 700x100 file is a 100x700 picture, so the
    # tiles run vertically (1,7), not (7,1).
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", exif=exif)
    rotated = Image.open(io.BytesIO(buf.getvalue()))
    out = proc(rotated)
    assert out.tensors["images_spatial_crop"].tolist() == [[1, 7]]
    assert out.num_image_tokens == proc.num_image_tokens(100, 700)


SWEEP = [
    (1, 1),  # upscaled to fill the whole view (pad scales up); no tiles
    (20000, 20),  # letterbox strip 1 px high (base/gundam), squashed in tiny/small, gundam (9,1) tiles
    (20, 20000),
    (20000, 1),  # letterbox height rounds to 0: Pillow 13 returns a pure grey view, no crash
    (640, 640),
    (641, 640),
    (640, 641),
    (300, 48),
    (1500, 500),
    (500, 1500),
    (1250, 1000),
    (1400, 1400),
    (3000, 2000),
    (999, 333),
    (2000, 64),
]


@pytest.mark.parametrize("mode", list(V1_MODES))
def test_num_image_tokens_agrees_with_call(mode):
    proc = DeepseekOCRImageProcessor(mode)
    side = V1_MODES[mode].base_size if V1_MODES[mode].crop else V1_MODES[mode].image_size
    for size in SWEEP:
        out = proc(Image.new("RGB", size, (200, 100, 50)))
        assert isinstance(out, ImageInputs)
        w, h = proc.tile_grid(*size)
        assert out.num_image_tokens == proc.num_image_tokens(*size), size
        assert out.tensors["images_spatial_crop"].tolist() == [[w, h]], size
        assert out.tensors["pixel_values"].shape == (1, 3, side, side), size
        n_tiles = 0 if (w, h) == (1, 1) else w * h
        assert out.tensors["pixel_values_local"].shape == (n_tiles, 3, TILE_SIZE, TILE_SIZE), size


def test_degenerate_line_gives_grey_global_view():
    # 20000x1 letterboxed to 1024 wide is round(0.05) = 0 px high: the global view carries no content.
    pv = normalize_pixels(DeepseekOCRImageProcessor("base")(Image.new("RGB", (20000, 1), (0, 0, 0))).tensors["pixel_values"])
    assert (pv == pad_value()).all()
