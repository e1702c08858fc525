"""Peer OCR engines: clear errors when missing; when installed, a rendered line is read and scored.

Engines are optional (see dsocr/peers.py for the install commands); their tests skip when absent.
"""

import subprocess
import sys

import pytest
from PIL import Image, ImageDraw, ImageFont

from dsocr import peers
from dsocr.metrics import NormalizeConfig

NORM = NormalizeConfig()

# Probe lines of the kinds peers are usually compared on: review, receipt with ￥, phone/order numbers, address, poem.
PROBE = [
    "海信LED46EC3发票金额￥128.00",
    "物流很快，包装完好，五星好评！",
    "订单号：20240517-3381 电话13800138000",
    "北京市海淀区中关村大街27号",
    "床前明月光，疑是地上霜。",
    "今天天气很好，适合出去散步",
    "价格实惠，质量不错，会回购",
    "第3季度营收同比增长12.5%",
]


def _engine_available(engine):
    try:
        peers.check_engine(engine)
    except peers.PeerEngineMissing as e:
        return str(e)
    return None


def _font(size=40):
    # Noto Sans CJK (Debian fonts-noto-cjk); index 2 of the .ttc is the SC face, any CJK face works.
    try:
        path = subprocess.run(
            ["fc-match", "-f", "%{file}", "Noto Sans CJK SC"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        path = ""
    if "CJK" not in path:
        pytest.skip("Noto Sans CJK font not installed (apt-get install fonts-noto-cjk)")
    return ImageFont.truetype(path, size, index=2 if path.endswith(".ttc") else 0)


def _render(text, font):
    w = int(font.getlength(text)) + 24
    im = Image.new("RGB", (w, font.size + 24), "white")
    ImageDraw.Draw(im).text((12, 6), text, font=font, fill="black")
    return im


def test_unknown_engine():
    with pytest.raises(ValueError, match="not one of tesseract, rapidocr"):
        peers.recognize_lines("paddle", [])


@pytest.mark.parametrize(
    ("engine", "module", "fix"),
    [
        ("tesseract", "pytesseract", "tesseract-ocr-chi-sim"),
        ("rapidocr", "onnxruntime", "pip install rapidocr==3.10.0 onnxruntime"),
    ],
)
def test_missing_engine_names_install_command(monkeypatch, engine, module, fix):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    peers._tesseract.cache_clear()
    peers._rapidocr.cache_clear()
    try:
        with pytest.raises(peers.PeerEngineMissing, match=fix):
            peers.recognize_lines(engine, [Image.new("RGB", (10, 10))])
    finally:
        peers._tesseract.cache_clear()
        peers._rapidocr.cache_clear()


def test_benchmark_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        peers.benchmark_engine("rapidocr", [], ["a"], normalize_cfg=NORM)


@pytest.mark.parametrize(("engine", "max_cer_norm"), [("rapidocr", 0.05), ("tesseract", 0.25)])
def test_rendered_line_recognised_and_scored(engine, max_cer_norm):
    why = _engine_available(engine)
    if why:
        pytest.skip(why)
    font = _font()
    ref = PROBE[0]
    (hyp,) = peers.recognize_lines(engine, [_render(ref, font)])
    assert isinstance(hyp, str) and hyp == hyp.strip() and hyp
    result = peers.benchmark_engine(engine, [_render(ref, font)], [ref], normalize_cfg=NORM, warmup=0)
    assert result["hypotheses"] == [hyp]  # deterministic
    assert result["n_lines"] == 1 and result["lines_per_s"] > 0
    assert result["corpus"]["cer_norm"] <= max_cer_norm, (engine, hyp)
    assert result["per_line"][0]["reference"] == ref


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "max_cer_norm"), [("rapidocr", 0.05), ("tesseract", 0.2)])
def test_probe_benchmark(engine, max_cer_norm):
    why = _engine_available(engine)
    if why:
        pytest.skip(why)
    font = _font(40)
    images = [_render(t, font) for t in PROBE]
    result = peers.benchmark_engine(engine, images, PROBE, normalize_cfg=NORM)
    c = result["corpus"]
    print(
        f"{engine}: {result['lines_per_s']:.1f} lines/s, CER raw {c['cer_raw']:.4f} norm {c['cer_norm']:.4f}"
    )
    for h in result["hypotheses"]:
        print("  ", h)
    assert c["cer_norm"] <= max_cer_norm
