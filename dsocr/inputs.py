"""Prediction inputs: image files, folders, globs and PDF files, decoded safely one item at a time.

    paths, errors = expand_inputs(["scans/", "receipt.jpg", "pages/*.png", "contract.pdf"])
    for item, image, error in load_items(paths, limits=ImageLimits()):
        ...  # image is an RGB PIL image, or error says which file/page and why

What an input is:

* a file: an image of any format PIL reads, or a ``.pdf`` (every page rasterised with pypdfium2);
* a folder: every file below it (recursively) whose suffix is an image suffix or ``.pdf``, sorted by path;
  other files (notes, labels) are left out;
* a glob (``pages/*.png``, ``scans/**/*.jpg``): the files it matches, sorted;
* anything else (a path that does not exist, a glob that matches nothing) is an ``InputError``.

Decoding is ``data.images.open_image``, the one decoder of training and evaluation, with the same limits
(pixel count read from the header before decoding, minimum side, aspect ratio) and the same reason codes
(``corrupt_image``, ``decompression_bomb``, ...). A PDF page is checked against the pixel limit *before* it
is rendered (its size in points times the render scale), then its bitmap goes through ``open_image`` too.
Nothing here raises for a bad input: each one becomes an ``InputError`` and the others go on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data.images import DEFAULT_LIMITS, BadRecordError, ImageLimits, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jp2", ".pbm", ".pgm", ".ppm")
PDF_SUFFIX = ".pdf"
DEFAULT_PDF_DPI = 200  # an A4 page becomes 1654 x 2339 px: small print stays readable, 3.9 M pixels


@dataclass(frozen=True)
class InputItem:
    """One image to predict: a file, or one page of a PDF (``page`` counts from 1; None for images)."""

    path: str
    page: int | None = None

    @property
    def id(self) -> str:
        """``path`` for an image, ``path#page=N`` for a PDF page: unique over one prediction run."""
        return self.path if self.page is None else f"{self.path}#page={self.page}"


@dataclass(frozen=True)
class InputError:
    """Why one input (or one PDF page) cannot be predicted.

    Attributes:
        path: The file (or the argument, when it named no file).
        page: The PDF page (from 1), or None.
        reason: A short code: ``data.images`` reason codes, ``not_found``, ``corrupt_pdf``,
            ``pdf_page_too_large``, ``pdf_render_failed``.
        message: One sentence with the value and the fix.
    """

    path: str
    page: int | None
    reason: str
    message: str

    def line(self) -> str:
        """The one line printed for this input: which file, why."""
        where = self.path if self.page is None else f"{self.path} (page {self.page})"
        return f"{where}: {self.reason}: {self.message}"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _wanted(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == PDF_SUFFIX


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[InputError]]:
    """Turn the command line's inputs into files, in order, each once; inputs that name nothing are errors.

    Args:
        inputs: Files, folders and globs as typed by the user.

    Returns:
        ``(files, errors)``: the files in argument order (a folder's or glob's files sorted by path),
        duplicates dropped; one ``InputError`` (reason ``not_found``) per argument that matched no file.
    """
    files: list[Path] = []
    errors: list[InputError] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normpath(str(path))
        if key not in seen:
            seen.add(key)
            files.append(path)

    for arg in inputs:
        path = Path(arg).expanduser()
        if path.is_file():
            add(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p))
            if not found:
                errors.append(InputError(arg, None, "not_found", f"folder {arg!r} holds no image or PDF file "
                                         f"({', '.join(IMAGE_SUFFIXES[:4])}, ..., {PDF_SUFFIX}); point at the files."))
            for p in found:
                add(p)
        elif _is_glob(arg):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(arg), recursive=True) if Path(p).is_file())
            if not found:
                errors.append(InputError(arg, None, "not_found", f"the pattern {arg!r} matches no file; check it "
                                         "(quote it so that the shell does not expand it first)."))
            for p in found:
                add(p)
        else:
            errors.append(InputError(arg, None, "not_found", f"{arg!r} does not exist; pass image files, folders, "
                                     "globs or PDF files."))
    return files, errors


def is_pdf(path: Path) -> bool:
    """A PDF by suffix or by its ``%PDF`` signature (a PDF saved without suffix is still one)."""
    if path.suffix.lower() == PDF_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"%PDF-"
    except OSError:
        return False


def pdf_page_count(path: Path) -> int | InputError:
    """Number of pages of a PDF, or the ``InputError`` that opening it gives."""
    doc = _open_pdf(path)
    if isinstance(doc, InputError):
        return doc
    try:
        return len(doc)
    finally:
        doc.close()


def _open_pdf(path: Path):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        return InputError(str(path), None, "corrupt_pdf", f"cannot open the PDF ({e}); re-export it, or remove "
                          "its password (encrypted PDFs are not read).")


def render_pdf_pages(path: Path, *, dpi: int = DEFAULT_PDF_DPI, limits: ImageLimits | None = None,
                     ) -> Iterator[tuple[InputItem, Image.Image | None, InputError | None]]:
    """Every page of a PDF as an RGB image at ``dpi``, one at a time; a bad page is an error, the rest go on.

    Args:
        path: The PDF file.
        dpi: Render resolution (72 = the page's size in points).
        limits: The image limits; the pixel limit is applied to the page size before rendering.

    Yields:
        ``(item, image, None)`` per good page, ``(item, None, error)`` per bad one; a PDF that cannot be
        opened yields one error with ``page=None``.
    """
    limits = limits or DEFAULT_LIMITS
    doc = _open_pdf(path)
    if isinstance(doc, InputError):
        yield InputItem(str(path)), None, doc
        return
    scale = dpi / 72.0
    try:
        for index in range(len(doc)):
            item = InputItem(str(path), index + 1)
            page = doc[index]
            try:
                w_pt, h_pt = page.get_size()
                w, h = round(w_pt * scale), round(h_pt * scale)
                if w * h > limits.max_pixels:
                    yield item, None, InputError(
                        item.path, item.page, "pdf_page_too_large",
                        f"the page is {w_pt:.0f}x{h_pt:.0f} pt, {w}x{h} = {w * h:,} pixels at {dpi} dpi, over the "
                        f"limit of {limits.max_pixels:,}; render it at a lower --pdf-dpi or raise the limit "
                        "(data.max_image_pixels in the run config).")
                    continue
                try:
                    image = page.render(scale=scale).to_pil()
                except Exception as e:  # noqa: BLE001 - pdfium raises its own and plain errors for broken pages
                    yield item, None, InputError(item.path, item.page, "pdf_render_failed",
                                                 f"the page cannot be rendered ({e}); re-export the PDF.")
                    continue
            finally:
                page.close()
            yield item, *_decode(image, item, limits)
    finally:
        doc.close()


def _decode(obj, item: InputItem, limits: ImageLimits) -> tuple[Image.Image | None, InputError | None]:
    try:
        return open_image(obj, record_id=item.id, limits=limits), None
    except BadRecordError as e:
        return None, InputError(item.path, item.page, e.reason, e.detail)


def load_items(files: list[Path], *, limits: ImageLimits | None = None, pdf_dpi: int = DEFAULT_PDF_DPI,
               ) -> Iterator[tuple[InputItem, Image.Image | None, InputError | None]]:
    """Decode ``files`` lazily, in order: images through ``open_image``, PDFs page by page.

    Yields:
        ``(item, image, None)`` for every good image or page, ``(item, None, error)`` for every bad one.
    """
    limits = limits or DEFAULT_LIMITS
    for path in files:
        if is_pdf(path):
            yield from render_pdf_pages(path, dpi=pdf_dpi, limits=limits)
        else:
            item = InputItem(str(path))
            yield item, *_decode(str(path), item, limits)
