"""Model families: one small adapter per DeepSeek-OCR generation (see ``base.ModelFamily``)."""

from __future__ import annotations

from importlib import import_module

from .base import ImageInputs, ImageProcessor, ModelFamily

# name -> "module:attribute"; imported lazily so that a config check loads no model code.
_FAMILIES = {
    "deepseek_ocr_v1": "dsocr.models.deepseek_ocr_v1.family:DeepseekOCRv1Family",
    "deepseek_ocr2": "dsocr.models.ocr2:DeepseekOCR2Family",
}
FAMILY_NAMES = tuple(_FAMILIES)
# Image modes per family, known without importing model code so that a config typo fails at once.
# Each family class declares the same tuple as ``image_modes`` (a test keeps the two equal).
FAMILY_IMAGE_MODES = {
    "deepseek_ocr_v1": ("tiny", "small", "base", "large", "gundam"),
    "deepseek_ocr2": ("gundam", "base", "small"),
}


def get_family(name: str) -> ModelFamily:
    """Return the family adapter registered as ``name`` (``model.family`` in the YAML)."""
    if name not in _FAMILIES:
        raise ValueError(f"model.family {name!r} is not one of {', '.join(FAMILY_NAMES)}")
    module, attr = _FAMILIES[name].split(":")
    return getattr(import_module(module), attr)()


__all__ = ["FAMILY_IMAGE_MODES", "FAMILY_NAMES", "ImageInputs", "ImageProcessor", "ModelFamily", "get_family"]
