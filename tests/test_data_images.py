"""data.images: every accepted mode converts correctly, every bad input raises with reason, id and value."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from data.images import BadRecordError, ImageLimits, open_image, validate_text


def encode(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def line(size=(60, 20), color=(0, 0, 0)):
    """A white line image with a dark block: a known pixel layout to check conversions."""
    im = Image.new("RGB", size, (255, 255, 255))
    im.paste(color, (5, 5, 15, 15))
    return im


# ------------------------------------------------------------------------------------- accepted forms
def test_accepts_pil_dict_bytes_and_path(tmp_path):
    data = encode(line())
    p = tmp_path / "a.png"
    p.write_bytes(data)
    for obj in (
        line(),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(p)},
        data,
        bytearray(data),
        str(p),
        p,
    ):
        im = open_image(obj, record_id="r")
        assert im.mode == "RGB" and im.size == (60, 20)
        assert im.getpixel((10, 10)) == (0, 0, 0) and im.getpixel((40, 10)) == (255, 255, 255)


def test_cmyk_converts():
    im = Image.new("CMYK", (40, 10), (0, 0, 0, 0))  # no ink = white
    im.paste((0, 0, 0, 255), (0, 0, 10, 10))  # black ink
    out = open_image(encode(im, "JPEG", quality=95), record_id="c")
    assert out.mode == "RGB"
    assert max(out.getpixel((30, 5))) > 240 and max(out.getpixel((3, 5))) < 20


def test_16bit_greyscale_is_rescaled_not_clipped():
    arr = np.full((10, 40), 32768, dtype=np.uint16)  # mid grey in 16 bit; PIL's convert would give 255
    arr[:, :10] = 0
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    out = open_image(encode(im), record_id="g16")
    assert out.getpixel((30, 5)) == (128, 128, 128) and out.getpixel((2, 5)) == (0, 0, 0)


def test_rgba_la_and_palette_transparency_composite_on_white():
    rgba = Image.new("RGBA", (40, 10), (0, 0, 0, 0))  # transparent BLACK: must become white
    rgba.paste((255, 0, 0, 255), (0, 0, 10, 10))
    out = open_image(encode(rgba), record_id="a")
    assert out.getpixel((30, 5)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)
    la = Image.new("LA", (40, 10), (0, 0))
    assert open_image(encode(la), record_id="la").getpixel((5, 5)) == (255, 255, 255)
    p = Image.new("P", (40, 10), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 10, 10))
    p.info["transparency"] = 0
    out = open_image(encode(p, transparency=0), record_id="p")
    assert out.getpixel((30, 5)) == (255, 255, 255) and out.getpixel((5, 5)) == (0, 0, 255)


def test_palette_greyscale_and_1bit():
    p = line().convert("P", palette=Image.ADAPTIVE)
    assert open_image(encode(p), record_id="p").getpixel((10, 10)) == (0, 0, 0)
    assert open_image(encode(line().convert("L")), record_id="l").getpixel((40, 10)) == (255, 255, 255)
    one = open_image(encode(line().convert("1")), record_id="1")
    assert (
        one.mode == "RGB"
        and one.getpixel((10, 10)) == (0, 0, 0)
        and one.getpixel((40, 10)) == (255, 255, 255)
    )


def test_exif_orientation_is_applied():
    im = line((60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = open_image(encode(im, "JPEG", exif=exif.tobytes()), record_id="e")
    assert out.size == (20, 60)


# ------------------------------------------------------------------------------------- bad inputs
def bad(obj, reason, *needles, **kw):
    with pytest.raises(BadRecordError) as ei:
        open_image(obj, record_id="rec-7", **kw)
    e = ei.value
    assert e.reason == reason and e.record_id == "rec-7"
    msg = str(e)
    assert "rec-7" in msg and reason in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert isinstance(e, ValueError)
    return msg


def test_corrupt_and_truncated():
    bad(b"this is not an image", "corrupt_image", "re-export")
    data = encode(line((200, 50)), "PNG")
    bad(data[: len(data) // 2], "corrupt_image", "truncated")
    jpg = encode(Image.effect_noise((200, 50), 50).convert("RGB"), "JPEG")
    bad(jpg[: len(jpg) // 2], "corrupt_image")


def test_lazy_truncated_pil_image():
    data = encode(Image.effect_noise((200, 50), 50).convert("RGB"), "PNG")
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # what a lazy decoder hands over
    bad(lazy, "corrupt_image", "truncated")


def test_empty_and_missing(tmp_path):
    bad(b"", "empty_image_file", "0 bytes")
    f = tmp_path / "zero.png"
    f.write_bytes(b"")
    bad(str(f), "empty_image_file", "zero.png")
    bad(str(tmp_path / "nope.png"), "missing_image_file", "nope.png", "image_root")
    bad({"bytes": None, "path": str(tmp_path / "nope.png")}, "missing_image_file", "nope.png")
    bad(None, "missing_image")
    bad({"bytes": None, "path": None}, "missing_image")
    bad(12, "invalid_image_value", "int")


def test_too_small_and_extreme_aspect():
    bad(encode(Image.new("RGB", (1, 1))), "too_small", "1x1", "minimum of 2")
    msg = bad(
        encode(Image.new("L", (20000, 20), 255)),
        "extreme_aspect",
        "20000x20",
        "1000.0:1",
        "100:1",
        "data.max_image_aspect",
        "skip",
    )
    assert "--max-aspect" in msg
    # the limit is configurable
    assert open_image(
        encode(Image.new("L", (20000, 20), 255)), record_id="x", limits=ImageLimits(max_aspect=2000)
    ).size == (20000, 20)
    bad(line((50, 10)), "too_small", "50x10", limits=ImageLimits(min_side=16))  # PIL inputs are checked too


def test_decompression_bomb_from_header():
    # 1-bit PNG: 36 M pixels compress to a few KB; our header check (limit 32 M) refuses it before decoding.
    data = encode(Image.new("1", (6000, 6000), 1))
    assert len(data) < 100_000
    bad(data, "decompression_bomb", "6000x6000", "36,000,000", "32,000,000", "data.max_image_pixels")
    # 100 M pixels: PIL's own check (89 M) fires first inside Image.open; still our error and message.
    bad(encode(Image.new("1", (10000, 10000), 1)), "decompression_bomb", "100000000", "--max-pixels")
    bad(
        encode(Image.new("L", (300, 300))),
        "decompression_bomb",
        "90,000",
        limits=ImageLimits(max_pixels=50_000),
    )


def test_pil_bomb_warning_becomes_our_error(monkeypatch):
    # Above PIL's own MAX_IMAGE_PIXELS, PIL warns (or raises at 2x): it must become our error, not a warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bad(encode(Image.new("L", (150, 100))), "decompression_bomb", "PIL")


# ------------------------------------------------------------------------------------- labels
def test_validate_text():
    assert validate_text("  合计￥12.50 \n", record_id="t") == "合计￥12.50"
    assert validate_text("中 国", record_id="t") == "中 国"  # inner spaces are kept
    cases = [
        (None, "empty_label", "None"),
        ("", "empty_label", "''"),
        (" \t\u3000", "empty_label", "whitespace"),
        (123, "label_not_string", "int"),
        (["a"], "label_not_string", "list"),
        ("字" * 300, "label_too_long", "300 characters"),
    ]
    for value, reason, needle in cases:
        with pytest.raises(BadRecordError) as ei:
            validate_text(value, record_id="val-3", max_chars=256)
        assert ei.value.reason == reason and ei.value.record_id == "val-3"
        assert needle in str(ei.value) and "val-3" in str(ei.value)
    with pytest.raises(BadRecordError, match="limit of 5"):
        validate_text("abcdef", record_id="x", max_chars=5)


def test_limit_messages_name_the_run_config_keys():
    # A training run sets its limits in the run config's data: block: the fix must name those keys.
    bomb = bad(
        encode(Image.new("L", (300, 300))), "decompression_bomb", limits=ImageLimits(max_pixels=50_000)
    )
    assert "data.max_image_pixels" in bomb and "--max-pixels" in bomb
    small = bad(line((50, 10)), "too_small", limits=ImageLimits(min_side=16))
    assert "data.min_image_side" in small and "--min-side" in small
    strip = bad(encode(Image.new("L", (3000, 20), 255)), "extreme_aspect")
    assert "data.max_image_aspect" in strip and "--max-aspect" in strip
    with pytest.raises(BadRecordError) as ei:
        validate_text("字" * 513, record_id="x")  # the default limit is 512
    assert "limit of 512" in str(ei.value)
    assert "data.max_label_chars" in str(ei.value) and "--max-label-chars" in str(ei.value)
    assert validate_text("字" * 512, record_id="x") == "字" * 512
