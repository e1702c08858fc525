"""Domain presets (data.domains) and the hard set (data.hardset): lines, tags, determinism, speed, hash."""

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from data import domains, hardset
from data.domains import DEGRADATIONS, DOMAINS, LEVEL_NAMES, DomainGenerator, length_bucket, rmb_upper
from data.loader import load_split

# Characters a domain line may use besides CJK ideographs and printable ASCII (no spaces anywhere).
EXTRA = set("：，（）￥¥×↑↓μ%")


@pytest.fixture(scope="module")
def gen():
    try:
        return DomainGenerator()
    except RuntimeError as e:  # no CJK fonts on this machine
        pytest.skip(str(e))


def _allowed(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or ("!" <= ch <= "~") or ch in EXTRA


@pytest.mark.parametrize(
    "cents, text",
    [(12000, "壹佰贰拾元整"), (100530, "壹仟零伍元叁角"), (10020005, "壹拾万零贰佰元零伍分"), (1000000, "壹万元整"),
     (100000100, "壹佰万零壹元整"), (2030400, "贰万零叁佰零肆元整"), (5, "伍分"), (12345, "壹佰贰拾叁元肆角伍分")],
)
def test_rmb_upper_writes_invoice_capital_numerals(cents, text):
    assert rmb_upper(cents) == text


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_lines_charset_tags_and_fonts(gen, domain):
    for i in range(60):
        level = LEVEL_NAMES[i % 4]
        line = gen.make(7, "train", i, domain=domain, level=level)
        bad = [c for c in line.text if not _allowed(c)]
        assert not bad, f"{line.text!r} has characters outside the domain charset: {bad}"
        assert 1 <= len(line.text) <= domains.MAX_CHARS
        assert set(line.tags) == set(domains.TAG_KEYS)
        assert line.tags["domain"] == domain
        assert line.tags["level"] == level
        assert line.tags["length"] == length_bucket(line.text)
        ops = line.tags["degradations"].split("+")
        if ops != ["none"]:
            assert ops == [d for d in DEGRADATIONS if d in ops], f"unknown or unordered ops {ops}"
        if level == "clean":
            assert not {"rotate", "blur", "noise", "downscale", "jpeg_low"} & set(ops)
        face = next(f for f in gen.faces[domain] if f.name == line.face)
        assert all(ord(c) in face.cmap for c in line.text), f"{line.face} lacks a glyph of {line.text!r}"
        im = Image.open(io.BytesIO(line.image))
        assert im.format == "JPEG"
        assert im.height >= 12


def test_invoice_lines_mix_fullwidth_and_halfwidth_punctuation(gen):
    texts = [gen.make(0, "train", i, domain="invoice").text for i in range(200)]
    joined = "".join(texts)
    assert "：" in joined
    assert ":" in joined
    assert "（" in joined
    assert "(" in joined
    assert any(t.endswith(("整", "分", "角")) and "元" in t for t in texts), "no capital-numeral amount"


def test_same_seed_same_bytes_other_seed_differs(gen):
    a = [gen.make(3, "val", i) for i in range(20)]
    b = [DomainGenerator().make(3, "val", i) for i in range(20)]
    c = [gen.make(4, "val", i) for i in range(20)]
    assert [(x.image, x.text, x.tags) for x in a] == [(x.image, x.text, x.tags) for x in b]
    assert [x.text for x in a] != [x.text for x in c]


def test_generated_split_has_tags_column_and_loader_keeps_it(gen, tmp_path):
    s1 = domains.generate_domains(str(tmp_path / "a"), {"train": 12, "val": 4}, seed=1)
    s2 = domains.generate_domains(str(tmp_path / "b"), {"train": 12, "val": 4}, seed=1, workers=2)
    for split in ("train", "val"):
        fa = tmp_path / "a" / "data" / f"{split}-00000-of-00001.parquet"
        fb = tmp_path / "b" / "data" / f"{split}-00000-of-00001.parquet"
        assert fa.read_bytes() == fb.read_bytes(), "output depends on --workers"
    rows = load_split(str(tmp_path / "a"), "train")
    assert rows.column_names == ["id", "image", "text", "tags"]
    assert set(rows[0]["tags"]) == set(domains.TAG_KEYS)
    assert sum(s1["tag_counts"]["domain"].values()) == 16
    assert s2["sizes"] == {"train": 12, "val": 4, "test": 0}


def test_hard_set_small_rebuild_is_bit_identical(gen, tmp_path):
    m1 = hardset.build(str(tmp_path / "h1"), per_cell=2)
    m2 = hardset.build(str(tmp_path / "h2"), per_cell=2, workers=2)
    assert m1["n_lines"] == len(DOMAINS) * len(LEVEL_NAMES) * 2
    assert m1["content_sha256"] == m2["content_sha256"]
    assert m1["file_sha256"] == m2["file_sha256"]
    assert m1["tag_counts"]["domain"] == dict.fromkeys(sorted(DOMAINS), 8)
    rows = load_split(str(tmp_path / "h1"), "test")
    assert rows[0]["id"] == "hard-v1-receipt-clean-000"
    assert rows[0]["tags"]["level"] == "clean"
    first16 = {(t["domain"], t["level"]) for t in rows["tags"][:16]}
    assert len(first16) == 16, "every prefix of 16 lines covers all (domain, level) cells"


def test_hard_set_check_names_what_differs(gen, tmp_path):
    m = hardset.build(str(tmp_path / "h"), per_cell=1)
    with pytest.raises(hardset.HardSetMismatch, match="per_cell 1 vs 125"):
        hardset.check(m)
    fake = dict(m, renderer={**m["renderer"], "freetype2": "0.0.0"})
    assert any("freetype2: here 0.0.0" in d for d in hardset.differences(fake, hardset.pinned()))


@pytest.mark.slow
def test_hard_set_full_build_matches_pinned_hash(gen, tmp_path):
    ref = hardset.pinned()
    m = hardset.build(str(tmp_path / "h"), workers=2)
    if hardset.differences(m, ref):
        pytest.skip(f"fonts/renderer differ from the pinned build: {hardset.differences(m, ref)}")
    hardset.check(m)
    assert m["n_lines"] == 2000


@pytest.mark.slow
@pytest.mark.parametrize("domain", DOMAINS)
def test_each_domain_renders_300_lines_per_cpu_second(gen, domain):
    gen.make(0, "train", 0, domain=domain)  # font load
    t = time.process_time()
    n = 300
    for i in range(n):
        gen.make(0, "train", i, domain=domain)
    rate = n / (time.process_time() - t)
    assert rate >= 300, f"{domain}: {rate:.0f} lines per CPU second (load {os.getloadavg()})"


def test_sample_grid_is_written(gen, tmp_path):
    path = domains.sample_grid(str(tmp_path / "g.png"), per_domain=2)
    im = Image.open(path)
    assert im.width > 4 * 100
    assert np.asarray(im).std() > 5  # not a blank canvas


def test_data_generate_reaches_the_domain_presets(gen, tmp_path):
    from data import generate

    assert generate.main(["--preset", "receipt", "--out", str(tmp_path), "--train", "6", "--val", "0",
                          "--test", "0"]) == 0
    rows = load_split(str(tmp_path), "train")
    assert {t["domain"] for t in rows["tags"]} == {"receipt"}
