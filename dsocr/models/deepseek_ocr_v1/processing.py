"""DeepSeek-OCR v1 image preprocessing for the five official modes (docs/MODEL_NOTES.md §3).

The official remote code has no processor class: ``DeepseekOCRForCausalLM.infer()`` preprocesses inline.
This module reproduces what ``infer()`` does, pixel for pixel (checked bit-exact against the goldens in
``tests/fixtures/golden/deepseek_ocr_v1/preprocess.json`` by ``tests/test_v1_preprocess_golden.py``):

* **tiny / small** (``image_size <= 640``, no crop): squash to ``S x S`` with a bicubic resize (the aspect
  ratio is lost), then ``ImageOps.pad`` to ``S x S`` (a no-op on a square).
* **base / large** (no crop): letterbox with ``ImageOps.pad`` (bicubic, scales up or down, centred) on a
  grey ``(127, 127, 127)`` canvas of ``S x S``.
* **gundam** (crop): global view letterboxed to ``base_size``; if a side exceeds 640 px, also a grid of
  ``w x h`` tiles of 640 x 640 cut row-major from the image resized (bicubic, aspect lost) to
  ``(640 w, 640 h)``; the grid is the candidate closest in aspect ratio, see ``tile_grid``.

Pixels: uint8 -> ``/ 255`` -> ``(x - 0.5) / 0.5`` in float32, i.e. values in ``[-1, 1]``. The processor
hands out the uint8 values; the model applies ``normalize_pixels`` on its device (float input passes).

Image slots per image (the feature rows the model writes into them, in this order): the tiles as one
``(n_t h) x (n_t w)`` token grid with a newline slot after each row, then the ``n x n`` global grid with a
newline after each row, then one view separator::

    n (n + 1) + 1  [+ (n_t w + 1) (n_t h)  when there are tiles]

with ``n = ceil((size // patch_size) / downsample_ratio)``: tiny 73, small 111, base 273, large 421,
gundam 273 (+ tiles, e.g. 1500x500 -> grid 3x1 -> 583).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from dsocr.models.base import ImageInputs, ImageProcessor

# ---------------------------------------------------------------------------------------------------------
# Official constants (DeepSeek-OCR v1 remote code, ``modeling_deepseekocr.py``: ``BasicImageTransform``,
# ``infer()`` and ``dynamic_preprocess``). Named once here; everything else is derived from them or from
# the model config (patch_size, downsample_ratio).
# ---------------------------------------------------------------------------------------------------------
#: ``BasicImageTransform(mean=(0.5,)*3, std=(0.5,)*3)``: maps [0, 1] to [-1, 1].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
#: ``infer()`` pads with ``tuple(int(x * 255) for x in mean)``: int(127.5) truncates to 127, not 128.
PAD_COLOR = tuple(int(m * 255) for m in IMAGE_MEAN)
# The official mean and std are the same for all three channels, so the normalisation takes scalars.
assert len(set(IMAGE_MEAN)) == 1 and len(set(IMAGE_STD)) == 1, "per-channel mean/std: normalize_pixels needs tensors"
_MEAN, _STD = IMAGE_MEAN[0], IMAGE_STD[0]
#: ``dynamic_preprocess`` cuts 640 x 640 tiles whatever the mode's ``image_size`` (it is its default
#: argument), and ``infer()`` tiles only when the width or the height exceeds 640.
TILE_SIZE = 640
#: ``dynamic_preprocess(min_num=2, max_num=9)``: allowed tile counts w*h (DeepSeek's vLLM config uses 6).
MIN_TILES = 2
MAX_TILES = 9
#: ``infer()`` squashes (``image.resize((S, S))``) before padding only in non-crop modes with S <= 640.
SQUASH_MAX_SIZE = 640
#: PIL's ``Image.resize`` default for RGB and ``ImageOps.pad``'s default: both official calls use bicubic.
RESAMPLE = Image.Resampling.BICUBIC


class V1Mode(NamedTuple):
    """One official image mode; a tuple, so ``V1_MODES["base"] == (1024, 1024, False)``.

    Attributes:
        base_size: Side of the global view in crop mode.
        image_size: Side of the global view without crop; the tile side used for token counts in crop mode.
        crop: Whether large images are also cut into tiles (gundam).
    """

    base_size: int
    image_size: int
    crop: bool


# The modes of the official README (base_size / image_size / crop_mode).
V1_MODES: dict[str, V1Mode] = {
    "tiny": V1Mode(512, 512, False),
    "small": V1Mode(640, 640, False),
    "base": V1Mode(1024, 1024, False),
    "large": V1Mode(1280, 1280, False),
    "gundam": V1Mode(1024, 640, True),
}


def tile_grid_candidates(min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """Candidate tile grids ``(width_tiles, height_tiles)`` in the exact order the official code tries them.

    The official code collects the grids with ``min_tiles <= i*j <= max_tiles`` in a Python ``set`` and
    sorts it by ``i*j`` only, so among grids with the same tile count the order is the set's iteration
    order. That order matters on exact ties (see ``DeepseekOCRImageProcessor.tile_grid``), so we rebuild it
    the same way: a set filled in the same insertion order. Tuples of small ints hash deterministically
    (no hash randomisation), so the order is stable; for (2, 9) it is (1,2) (2,1) (3,1) (1,3) (2,2) (4,1)
    (1,4) (5,1) (1,5) (1,6) (6,1) (3,2) (2,3) (7,1) (1,7) (4,2) (2,4) (1,8) (8,1) (1,9) (3,3) (9,1)
    (docs/MODEL_NOTES.md §3; asserted in the tests).

    Args:
        min_tiles: Smallest allowed number of tiles.
        max_tiles: Largest allowed number of tiles.

    Returns:
        The candidate grids in trial order.
    """
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_tiles <= i * j <= max_tiles:
                    grids.add((i, j))
    # sorted() is stable: equal tile counts keep the set's iteration order.
    return sorted(grids, key=lambda g: g[0] * g[1])


def _to_pixels(images: list[Image.Image], side: int) -> torch.Tensor:
    """Stack RGB images of ``side x side`` into uint8 ``[N, 3, side, side]`` (``normalize_pixels`` maps them).

    The pixels stay uint8 until they reach the model: a quarter of float32's bytes to pin and copy to the
    GPU, and the same values, since the normalisation is a fixed elementwise map of each byte.
    """
    if not images:
        return torch.zeros((0, 3, side, side), dtype=torch.uint8)
    hwc = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [N, H, W, 3]
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in ``[-1, 1]``, on whatever device they are; float input is returned as is.

    Same arithmetic, in the same order and dtype, as torchvision's ``ToTensor`` (uint8 -> float32,
    ``div(255)``) followed by ``Normalize`` (``sub(mean)``, ``div(std)``) in the official transform, so the
    bits match the official preprocessing (all three ops are correctly rounded float32 operations).
    """
    if pixels.dtype != torch.uint8:
        return pixels
    # Scalars, not per-channel tensors: building those on a GPU at every call is a blocking host copy.
    return pixels.to(torch.float32).div_(255).sub_(_MEAN).div_(_STD)


class DeepseekOCRImageProcessor(ImageProcessor):
    """Official DeepSeek-OCR v1 preprocessing for one mode (tiny, small, base, large, gundam).

    Output of ``__call__`` (one image):

    * ``pixel_values``: uint8 ``[1, 3, S, S]``, the global view (S = ``base_size`` in crop mode, else
      ``image_size``).
    * ``pixel_values_local``: uint8 ``[P, 3, 640, 640]``, the tiles in row-major order; ``P = 0`` when
      there are none (the official code passes an all-zero ``[1, 3, base, base]`` sentinel instead; the
      model side builds that if it needs it).
    * ``images_spatial_crop``: long ``[1, 2]`` = ``[[width_tiles, height_tiles]]``, ``[[1, 1]]`` without tiles.
    * ``num_image_tokens``: image slots the official layout needs (module docstring).

    Args:
        mode: One of ``V1_MODES``.
        patch_size: SAM patch size (model config; 16).
        downsample_ratio: Total downsampling of the SAM map by the compressor (model config; 4).
        min_tiles: Smallest tile count in crop mode.
        max_tiles: Largest tile count in crop mode.

    Raises:
        ValueError: On an unknown mode or non-positive sizes.
    """

    def __init__(
        self,
        mode: str,
        patch_size: int = 16,
        downsample_ratio: int = 4,
        min_tiles: int = MIN_TILES,
        max_tiles: int = MAX_TILES,
    ) -> None:
        if mode not in V1_MODES:
            raise ValueError(f"image mode {mode!r} is not one of {', '.join(V1_MODES)}")
        problems = []
        if patch_size < 1 or downsample_ratio < 1:
            problems.append(f"patch_size {patch_size} and downsample_ratio {downsample_ratio} must be >= 1")
        if not 1 <= min_tiles <= max_tiles:
            problems.append(
                f"need 1 <= min_tiles <= max_tiles, got min_tiles {min_tiles}, max_tiles {max_tiles}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        self.mode = mode
        self.base_size, self.image_size, self.crop = V1_MODES[mode]
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        # Global view side: the official code uses base_size with crop, image_size without.
        self.global_size = self.base_size if self.crop else self.image_size
        self.candidates = tile_grid_candidates(min_tiles, max_tiles)
        # Token grid sides. Tiles are always 640 px, but the official count per tile uses image_size; the
        # two agree for gundam (the only crop mode here), and our model encodes the 640 px tiles, so a crop
        # mode with another image_size would give a feature/slot mismatch (as in the official code).
        if self.crop and self.image_size != TILE_SIZE:
            raise ValueError(
                f"crop mode {mode!r} needs image_size {TILE_SIZE} (the tile side), got {self.image_size}"
            )
        self.n_global = self.grid_side(self.global_size)
        self.n_tile = self.grid_side(TILE_SIZE)

    def grid_side(self, size: int) -> int:
        """Token grid side for a square view of ``size`` px: ``ceil((size // patch) / downsample)``.

        Args:
            size: View side in pixels.

        Returns:
            Tokens per grid row (16 for 1024 with patch 16 and downsample 4).
        """
        return -(-(size // self.patch_size) // self.downsample_ratio)

    def tile_grid(self, width: int, height: int) -> tuple[int, int]:
        """Tile grid ``(width_tiles, height_tiles)`` for an image; ``(1, 1)`` means no tiles.

        Only crop modes tile, and only when a side exceeds 640 px. The grid is the first candidate (in
        ``tile_grid_candidates`` order) with the smallest ``|width/height - i/j|``, except that on an exact
        tie a later candidate replaces the current best when the image area exceeds half the area of the
        candidate's grid (``w*h > 0.5 * 640**2 * i * j``): larger images prefer more tiles. Ties are exact
        float comparisons, as in the official code.

        Args:
            width: Image width in pixels (after EXIF transpose).
            height: Image height in pixels.

        Returns:
            ``(width_tiles, height_tiles)``.
        """
        _check_size(width, height)
        if not self.crop or (width <= TILE_SIZE and height <= TILE_SIZE):
            return (1, 1)
        aspect = width / height
        area = width * height
        best, best_diff = (1, 1), float("inf")
        for i, j in self.candidates:
            diff = abs(aspect - i / j)
            if diff < best_diff:
                best, best_diff = (i, j), diff
            elif diff == best_diff and area > 0.5 * TILE_SIZE * TILE_SIZE * i * j:
                # Note: best_diff is unchanged (equal), only the grid moves to the later candidate.
                best = (i, j)
        return best

    def num_image_tokens(self, width: int, height: int) -> int:
        """Image slots for an image of this size, without building pixels.

        Args:
            width: Image width in pixels (after EXIF transpose).
            height: Image height in pixels.

        Returns:
            ``n (n + 1) + 1`` for the global view and separator, plus ``(n_t w + 1)(n_t h)`` with tiles.
        """
        n = self.n_global
        tokens = n * (n + 1) + 1
        w, h = self.tile_grid(width, height)
        if (w, h) != (1, 1):
            tokens += (self.n_tile * w + 1) * (self.n_tile * h)
        return tokens

    def __call__(self, image: Image.Image) -> ImageInputs:
        """Preprocess one image exactly as the official ``infer()``.

        Args:
            image: A PIL image; EXIF-transposed and converted to RGB here too (idempotent if the data layer
                already did it, as the official code does it).

        Returns:
            ``ImageInputs`` with ``pixel_values``, ``pixel_values_local``, ``images_spatial_crop`` (see the
            class docstring) and ``num_image_tokens``.
        """
        # exif_transpose drops the orientation tag after rotating, so a second call is a plain copy.
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            # Like the official .convert("RGB"): alpha is dropped, not composited on white.
            image = image.convert("RGB")
        width, height = image.size
        grid = self.tile_grid(width, height)

        # Global view. Tiny/small squash first (aspect lost); pad is then a no-op on the square. Base/large
        # and gundam letterbox the original image (centred, scaled up or down) on grey.
        view = image
        if not self.crop and self.image_size <= SQUASH_MAX_SIZE:
            view = view.resize((self.image_size, self.image_size), resample=RESAMPLE)
        view = ImageOps.pad(view, (self.global_size, self.global_size), method=RESAMPLE, color=PAD_COLOR)

        # Tiles: resize the original to the whole grid (aspect lost), cut row-major (left to right, then down).
        tiles = []
        if grid != (1, 1):
            gw, gh = grid
            resized = image.resize((TILE_SIZE * gw, TILE_SIZE * gh), resample=RESAMPLE)
            for row in range(gh):
                for col in range(gw):
                    box = (col * TILE_SIZE, row * TILE_SIZE, (col + 1) * TILE_SIZE, (row + 1) * TILE_SIZE)
                    tiles.append(resized.crop(box))

        tensors = {
            "pixel_values": _to_pixels([view], self.global_size),
            "pixel_values_local": _to_pixels(tiles, TILE_SIZE),
            "images_spatial_crop": torch.tensor([list(grid)], dtype=torch.long),
        }
        return ImageInputs(tensors=tensors, num_image_tokens=self.num_image_tokens(width, height))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 pixels, got {width}x{height}")
