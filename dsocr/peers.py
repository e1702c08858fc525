"""Optional peer OCR engines (Tesseract, RapidOCR) scored through the same metrics as our model.

A baseline is only comparable if it reads the same line crops and goes through the same
:func:`dsocr.metrics.score_lines`; this module gives both. Neither engine is a dependency of the project:
each is imported when first used, and a missing one raises :class:`PeerEngineMissing` naming the install
command. Tests skip when they are absent.

Engines (recognition only, one text line per image):

* ``tesseract``: Tesseract 5 ``chi_sim`` with ``--psm 7`` ("treat the image as a single text line") through
  pytesseract. Install: ``apt-get install tesseract-ocr tesseract-ocr-chi-sim`` and
  ``pip install pytesseract==0.3.13``. It puts spaces between CJK glyphs, so compare on the normalised CER.
* ``rapidocr``: RapidOCR 3.10.0, recogniser only (PP-OCRv6 small rec, shipped in the wheel; no detection,
  no angle classifier: running the detector on a line crop is far worse and ~100× slower). Install:
  ``pip install rapidocr==3.10.0 onnxruntime`` (onnxruntime is not a dependency of rapidocr; without it
  rapidocr tries other back ends whose models it downloads, which fails offline).

Example::

    from dsocr.metrics import NormalizeConfig
    from dsocr.peers import benchmark_engine
    result = benchmark_engine("rapidocr", images, refs, normalize_cfg=NormalizeConfig())
    print(result["corpus"]["cer_norm"], result["lines_per_s"])
"""

from __future__ import annotations

import functools
import shutil
import time
from typing import TYPE_CHECKING

from dsocr.metrics import NormalizeConfig, score_lines

if TYPE_CHECKING:
    from PIL import Image

ENGINES = ("tesseract", "rapidocr")

_INSTALL = {
    "tesseract": "apt-get install tesseract-ocr tesseract-ocr-chi-sim && pip install pytesseract==0.3.13",
    "rapidocr": "pip install rapidocr==3.10.0 onnxruntime",
}


class PeerEngineMissing(ImportError):
    """A peer engine (or a part of it: binary, language data, runtime) is not installed."""


def _missing(engine: str, what: str) -> PeerEngineMissing:
    return PeerEngineMissing(f"peer engine {engine!r} unavailable: {what}. To fix: {_INSTALL[engine]}")


@functools.cache
def _tesseract():
    """Import pytesseract and check the binary and the chi_sim data; cached so the check runs once."""
    try:
        import pytesseract
    except ImportError as e:
        raise _missing("tesseract", "python package pytesseract not installed") from e
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        raise _missing("tesseract", f"binary {pytesseract.pytesseract.tesseract_cmd!r} not on PATH")
    langs = pytesseract.get_languages(config="")
    if "chi_sim" not in langs:
        raise _missing("tesseract", f"language data chi_sim not installed (have {sorted(langs)})")
    return pytesseract


@functools.cache
def _rapidocr():
    """Build the RapidOCR recogniser once (model load) and reuse it."""
    try:
        import onnxruntime  # noqa: F401  (checked explicitly: rapidocr does not depend on it)
    except ImportError as e:
        raise _missing("rapidocr", "onnxruntime not installed") from e
    try:
        from rapidocr import RapidOCR
    except ImportError as e:
        raise _missing("rapidocr", "python package rapidocr not installed") from e
    # Detector and classifier off: the input is already one line. Default rec model = the shipped one.
    return RapidOCR(params={"Global.use_det": False, "Global.use_cls": False, "Global.log_level": "warning"})


def check_engine(engine: str) -> None:
    """Raise if ``engine`` cannot run here.

    Args:
        engine: ``"tesseract"`` or ``"rapidocr"``.

    Raises:
        ValueError: If the name is not one of :data:`ENGINES`.
        PeerEngineMissing: If a part of the engine is not installed; the message names the install command.
    """
    if engine not in ENGINES:
        raise ValueError(f"peer engine {engine!r} is not one of {', '.join(ENGINES)}")
    (_tesseract if engine == "tesseract" else _rapidocr)()


def _recognize_one(engine: str, image: Image.Image) -> str:
    image = image.convert("RGB")  # both engines take RGB PIL images; drops alpha/palette modes
    if engine == "tesseract":
        text = _tesseract().image_to_string(image, lang="chi_sim", config="--psm 7")
    else:
        out = _rapidocr()(image, use_det=False, use_cls=False, use_rec=True)
        text = "".join(out.txts or ())
    # Tesseract ends with "\n\f"-like trailers; a line has no outer whitespace.
    return text.strip()


def recognize_lines(engine: str, images: list[Image.Image]) -> list[str]:
    """Recognise one text line per image with a peer engine.

    Args:
        engine: ``"tesseract"`` (chi_sim, ``--psm 7``) or ``"rapidocr"`` (3.10.0 recogniser only).
        images: Line crops as PIL images (any mode; converted to RGB).

    Returns:
        One string per image, outer whitespace stripped (``""`` where nothing was read).

    Raises:
        ValueError: If the engine name is unknown.
        PeerEngineMissing: If the engine is not installed (the message names the pip/apt command).
    """
    check_engine(engine)
    return [_recognize_one(engine, im) for im in images]


def benchmark_engine(
    engine: str,
    images: list[Image.Image],
    refs: list[str],
    *,
    normalize_cfg: NormalizeConfig,
    warmup: int = 1,
) -> dict:
    """Recognise ``images`` with a peer engine, time it and score it with :func:`dsocr.metrics.score_lines`.

    Args:
        engine: ``"tesseract"`` or ``"rapidocr"``.
        images: Line crops.
        refs: Reference text, one per image.
        normalize_cfg: Normalisation for the ``*_norm`` metrics (use the one of the model you compare with).
        warmup: Images recognised once before timing (model load and first-call costs are not throughput).

    Returns:
        ``{"engine", "n_lines", "seconds", "lines_per_s", "hypotheses", "corpus", "per_line"}`` where
        ``corpus`` / ``per_line`` are :func:`dsocr.metrics.score_lines`'s.

    Raises:
        ValueError: If ``images`` and ``refs`` differ in length or the engine name is unknown.
        PeerEngineMissing: If the engine is not installed.
    """
    if len(images) != len(refs):
        raise ValueError(f"images and refs differ in length: {len(images)} vs {len(refs)}")
    check_engine(engine)
    for im in images[:warmup]:
        _recognize_one(engine, im)
    t0 = time.perf_counter()
    hyps = recognize_lines(engine, images)
    seconds = time.perf_counter() - t0
    corpus, per_line = score_lines(refs, hyps, normalize_cfg=normalize_cfg)
    return {
        "engine": engine,
        "n_lines": len(images),
        "seconds": seconds,
        "lines_per_s": len(images) / seconds if seconds > 0 else float("inf"),
        "hypotheses": hyps,
        "corpus": corpus,
        "per_line": per_line,
    }
