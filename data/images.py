"""The one place where dataset images are decoded and labels are validated.

Every image that reaches the model goes through :func:`open_image`, every label through
:func:`validate_text`. Both raise :class:`BadRecordError` (a ``ValueError``) with a short ``reason`` code and
a message that names the record, the offending value and the fix, so the training path
(``data.convert``) and the scanner (``python -m data.check``) report exactly the same problems.

Accepted image values (``obj``):

* a ``PIL.Image.Image`` (already decoded, e.g. from ``datasets.Image()``);
* a ``{"bytes": b, "path": p}`` dict: the form of ``datasets.Image(decode=False)``; bytes win over path;
* raw ``bytes`` / ``bytearray`` / ``memoryview`` of an encoded file;
* a path (``str`` or ``os.PathLike``).

What "decoded correctly" means here:

* EXIF orientation is applied (phone photos are often stored sideways with an orientation tag);
* the result is always 8-bit ``RGB``: transparency (RGBA, LA, PA, P or L/RGB with a ``tRNS`` colour) is
  composited on **white**, because text lines are dark ink on paper and PIL's plain ``convert("RGB")``
  would turn transparent pixels black; 16-bit and 32-bit integer greyscale is rescaled (PIL's
  ``convert`` would clip everything above 255 to white); CMYK, palette, greyscale and 1-bit use PIL's
  conversion;
* limits (:class:`ImageLimits`): a maximum pixel count (decompression bombs are refused from the header,
  before any pixel is decoded), a minimum side and a maximum aspect ratio. An extreme aspect ratio is an
  **error, not a silent resize**: a 20000x20 "line" squeezed into a square model input is unreadable, and
  silently changing the data hides a broken record. Raise the limit (``ImageLimits(max_aspect=...)``,
  ``python -m data.check --max-aspect``) if such images are genuine, or skip them
  (``ConversationDataset(on_bad_record="skip")``), which logs each one.

One set of limits: :class:`ImageLimits`' defaults and :data:`DEFAULT_MAX_LABEL_CHARS` are the defaults of
the run config's ``data.max_image_pixels``, ``data.min_image_side``, ``data.max_image_aspect`` and
``data.max_label_chars`` and of ``python -m data.check``'s ``--max-pixels``, ``--min-side``,
``--max-aspect`` and ``--max-label-chars``; ``python -m data.check --config RUN.yaml`` reads the run's
values, so the scan and training apply the same limits. Error messages name both the config key and the
flag.

Reason codes: ``missing_image``, ``invalid_image_value``, ``missing_image_file``, ``empty_image_file``,
``corrupt_image``, ``unsupported_mode``, ``decompression_bomb``, ``too_small``, ``extreme_aspect``,
``empty_label``, ``label_not_string``, ``label_too_long``, ``missing_column`` (the last one is raised by the
loader).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A text line longer than this is almost certainly a broken record (the reference data has 1-15
# characters per line); raise it for paragraph-level data.
DEFAULT_MAX_LABEL_CHARS = 512


class BadRecordError(ValueError):
    """One record of a dataset cannot be used.

    Attributes:
        record_id: The record's ``id`` (as produced by ``data.loader.load_split``).
        reason: A short machine-readable code, e.g. ``corrupt_image`` or ``empty_label``.
    """

    def __init__(self, record_id: str, reason: str, message: str):
        """Build the error; the message is prefixed with the record id and reason code."""
        self.record_id = str(record_id)
        self.reason = reason
        self.detail = message
        super().__init__(f"record {self.record_id!r}: {reason}: {message}")

    def to_dict(self) -> dict[str, str]:
        """Return ``{"id", "reason", "message"}`` for JSON reports."""
        return {"id": self.record_id, "reason": self.reason, "message": str(self)}


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied by :func:`open_image`.

    Attributes:
        max_pixels: Refuse images with more pixels than this (width * height), read from the header
            before decoding. 32 M pixels is ~100x the largest sane text line and ~96 MB as RGB.
        min_side: Refuse images whose width or height is smaller (a 1x1 image carries no text).
        max_aspect: Refuse images whose long side / short side exceeds this. Reference lines are about
            15:1; 100:1 leaves room for long receipts while catching 20000x20 strips.
    """

    max_pixels: int = 32_000_000
    min_side: int = 2
    max_aspect: float = 100.0


DEFAULT_LIMITS = ImageLimits()


def _describe(obj: Any) -> str:
    """Return a short description of an image value for error messages (never the full bytes)."""
    if isinstance(obj, dict):
        b = obj.get("bytes")
        return f"dict(bytes={'None' if b is None else f'<{len(b)} bytes>'}, path={obj.get('path')!r})"
    if isinstance(obj, bytes | bytearray | memoryview):
        return f"<{len(obj)} bytes>"
    return repr(obj)[:200]


def _source(obj: Any, record_id: str) -> tuple[Any, str]:
    """Turn an accepted image value into something ``Image.open`` takes, plus a description.

    Raises:
        BadRecordError: missing, empty or unreadable inputs.
    """
    if obj is None:
        raise BadRecordError(
            record_id, "missing_image", "the image value is None; every record needs an image."
        )
    if isinstance(obj, dict):
        data, path = obj.get("bytes"), obj.get("path")
        if data is not None:
            obj = data
        elif path:
            obj = path
        else:
            raise BadRecordError(
                record_id, "missing_image", f"image dict has neither bytes nor path ({_describe(obj)})."
            )
    if isinstance(obj, bytes | bytearray | memoryview):
        if len(obj) == 0:
            raise BadRecordError(
                record_id, "empty_image_file", "the image bytes are empty (0 bytes); re-export the image."
            )
        return io.BytesIO(bytes(obj)), _describe(obj)
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise BadRecordError(
                record_id,
                "missing_image_file",
                f"image file {path!r} does not exist; check the manifest path or pass image_root "
                "(--image-root) so relative paths resolve.",
            )
        if os.path.getsize(path) == 0:
            raise BadRecordError(
                record_id, "empty_image_file", f"image file {path!r} is empty (0 bytes); re-export it."
            )
        return path, repr(path)
    raise BadRecordError(
        record_id,
        "invalid_image_value",
        f"cannot read an image from a {type(obj).__name__} ({_describe(obj)}); expected a PIL image, "
        "{'bytes': ..., 'path': ...}, bytes or a path.",
    )


def _check_size(im: Image.Image, record_id: str, where: str, limits: ImageLimits) -> None:
    """Apply the pixel, side and aspect limits to an opened (maybe not yet decoded) image."""
    w, h = im.size
    if w * h > limits.max_pixels:
        raise BadRecordError(
            record_id,
            "decompression_bomb",
            f"image {where} is {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,} "
            "(possible decompression bomb); downscale it or raise the limit (data.max_image_pixels in the run "
            "config, --max-pixels for data.check).",
        )
    if min(w, h) < limits.min_side:
        raise BadRecordError(
            record_id,
            "too_small",
            f"image {where} is {w}x{h}, a side is below the minimum of {limits.min_side} px; "
            "it cannot hold a text line: fix or drop the record, or lower the limit (data.min_image_side in "
            "the run config, --min-side for data.check) if such images are genuine.",
        )
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        raise BadRecordError(
            record_id,
            "extreme_aspect",
            f"image {where} is {w}x{h}, aspect ratio {aspect:.1f}:1 exceeds the limit {limits.max_aspect:g}:1; "
            "split the line, raise the limit (data.max_image_aspect in the run config, --max-aspect for "
            "data.check) if it is genuine, or skip the record (data.on_bad_record: skip).",
        )


def _to_rgb(im: Image.Image, record_id: str, where: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Composite on white: PIL's convert("RGB") drops alpha and reveals whatever colour the transparent
        # pixels hold (usually black), which would turn a transparent background into a black one.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        # 16/32-bit greyscale: PIL's convert clips at 255 (a 16-bit scan becomes nearly all white), so rescale.
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (
            mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535 and arr.max() > 255
        ):
            arr = arr / 257.0  # 65535 -> 255, the exact 16 -> 8 bit mapping
        elif mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadRecordError(
            record_id,
            "unsupported_mode",
            f"image {where} has mode {mode!r} that cannot be converted to RGB ({e}); re-export it as PNG/JPEG.",
        ) from e


def open_image(obj: Any, *, record_id: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode one dataset image into an 8-bit RGB PIL image, or raise :class:`BadRecordError`.

    Args:
        obj: A PIL image, a ``{"bytes", "path"}`` dict, raw encoded bytes, or a file path.
        record_id: The record's id, used in error messages.
        limits: Size limits; ``None`` uses :data:`DEFAULT_LIMITS`.

    Returns:
        A fully loaded ``RGB`` image with EXIF orientation applied.

    Raises:
        BadRecordError: With reason ``missing_image``, ``invalid_image_value``, ``missing_image_file``,
            ``empty_image_file``, ``corrupt_image``, ``unsupported_mode``, ``decompression_bomb``,
            ``too_small`` or ``extreme_aspect``.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(obj, Image.Image):
        im, where = obj, f"<PIL {obj.mode} {obj.size[0]}x{obj.size[1]}>"
        _check_size(im, record_id, where, limits)
        try:
            im.load()  # a lazily opened PIL image (datasets.Image()) may still be truncated
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadRecordError(
                record_id, "corrupt_image", f"image {where} cannot be decoded ({e}); re-export it."
            ) from e
    else:
        src, where = _source(obj, record_id)
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # A global flag someone else set would make truncated files load as grey padding: refuse to
            # pretend such data is fine.
            warnings.warn(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected.",
                stacklevel=2,
            )
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own explicit limit is checked
        # from the header right after open, and PIL's warning is turned into our error too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(src)
                _check_size(im, record_id, where, limits)  # before decoding a single pixel
                im.load()
            except BadRecordError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise BadRecordError(
                    record_id,
                    "decompression_bomb",
                    f"image {where} refused by PIL as a decompression bomb ({e}); our own limit is "
                    f"{limits.max_pixels:,} pixels (data.max_image_pixels in the run config, --max-pixels for "
                    "data.check): downscale the image.",
                ) from e
            except Image.UnidentifiedImageError as e:
                raise BadRecordError(
                    record_id,
                    "corrupt_image",
                    f"image {where} is not a recognised image format (corrupt or not an image); re-export it.",
                ) from e
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                # "image file is truncated", broken chunks, bad headers...
                raise BadRecordError(
                    record_id, "corrupt_image", f"image {where} cannot be decoded ({e}); re-export it."
                ) from e
    try:
        im = ImageOps.exif_transpose(im)  # returns a copy; a no-op without an orientation tag
    except Exception as e:  # noqa: BLE001 - a malformed EXIF block is a record problem, never a crash
        raise BadRecordError(
            record_id, "corrupt_image", f"image {where} has a malformed EXIF block ({e}); strip its metadata."
        ) from e
    _check_size(
        im, record_id, where, limits
    )  # again: EXIF rotation swaps sides, PIL inputs skip the first check
    return _to_rgb(im, record_id, where)


def validate_text(text: Any, *, record_id: str, max_chars: int = DEFAULT_MAX_LABEL_CHARS) -> str:
    """Check one label and return it stripped of surrounding whitespace.

    Inner whitespace is kept (it is part of the transcription; metrics decide how to treat it).

    Args:
        text: The raw label value.
        record_id: The record's id, used in error messages.
        max_chars: Maximum length after stripping.

    Returns:
        The stripped label.

    Raises:
        BadRecordError: With reason ``empty_label`` (None, empty or whitespace-only),
            ``label_not_string`` or ``label_too_long``.
    """
    if text is None:
        raise BadRecordError(
            record_id, "empty_label", "the label is None (missing); every record needs its transcription."
        )
    if not isinstance(text, str):
        raise BadRecordError(
            record_id,
            "label_not_string",
            f"the label is a {type(text).__name__} ({text!r:.80}), not a string; store labels as text "
            '(e.g. quote numbers in JSONL: "123").',
        )
    stripped = text.strip()
    if not stripped:
        raise BadRecordError(record_id, "empty_label", f"the label {text!r:.40} is empty or whitespace only.")
    if len(stripped) > max_chars:
        raise BadRecordError(
            record_id,
            "label_too_long",
            f"the label has {len(stripped)} characters, over the limit of {max_chars} "
            f"(starts {stripped[:20]!r}); split the line or raise the limit (data.max_label_chars in the run "
            "config, --max-label-chars for data.check).",
        )
    return stripped
