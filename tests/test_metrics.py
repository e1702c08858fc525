"""Pin every metric and error kind of dsocr/metrics.py on hand-made Chinese lines with exact numbers."""

import json
import math

import jiwer
import pytest

from dsocr.metrics import (
    ERROR_KINDS,
    ErrorKindConfig,
    NormalizeConfig,
    describe,
    normalize,
    perplexity,
    score_lines,
)

NORM = NormalizeConfig()  # NFKC + remove whitespace (docs/MODEL_NOTES.md §7)


def score(refs, hyps, **kw):
    kw.setdefault("normalize_cfg", NORM)
    return score_lines(refs, hyps, **kw)


def one(ref, hyp, **kw):
    return score([ref], [hyp], **kw)[1][0]


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------


def test_normalize_steps_and_describe():
    # Full-width colon, yen, digits, dot and the ideographic space U+3000.
    assert normalize("金额：￥１２８．００　元", NORM) == "金额:¥128.00元"
    assert normalize("中 国", NORM) == "中国"
    assert normalize("  LED  ", NormalizeConfig(lowercase=True)) == "led"
    # Each step is switchable.
    assert normalize("￥ 1", NormalizeConfig(nfkc=False)) == "￥1"
    assert normalize("中　国", NormalizeConfig(remove_whitespace=False)) == "中 国"  # U+3000 → space by NFKC
    assert normalize(" 中 国 ", NormalizeConfig(nfkc=False, remove_whitespace=False)) == "中 国"
    # CJK punctuation without a half-width form is kept.
    assert normalize("好。、", NORM) == "好。、"
    assert describe(NORM) == "NFKC (full→half width, U+3000→space, ￥→¥) → remove whitespace"
    assert (
        describe(NormalizeConfig(nfkc=False, remove_whitespace=True, lowercase=True))
        == "remove whitespace → lowercase"
    )
    assert describe(NormalizeConfig(nfkc=False, remove_whitespace=False)) == "none (strip only)"


# ---------------------------------------------------------------------------------------------------------
# CER, counts, NED, line accuracy
# ---------------------------------------------------------------------------------------------------------


def test_reference_example():
    refs = ["海信LED46EC3发票金额", "物流很快"]
    hyps = ["海信LED46EC3发要金额额", "物流快"]
    c, lines = score(refs, hyps)
    assert c["cer_raw"] == pytest.approx(3 / 18) and round(c["cer_raw"], 4) == 0.1667
    assert c["cer_raw"] == pytest.approx(jiwer.cer(refs, hyps))  # raw = jiwer's default
    assert (c["hits_raw"], c["substitutions_raw"], c["deletions_raw"], c["insertions_raw"]) == (16, 1, 1, 1)
    assert (c["hits_norm"], c["substitutions_norm"], c["deletions_norm"], c["insertions_norm"]) == (
        16,
        1,
        1,
        1,
    )
    assert c["edits_raw"] == 3 and c["ref_chars_raw"] == 18 and c["hyp_chars_raw"] == 18
    assert c["cer_norm"] == pytest.approx(3 / 18)
    assert c["n_lines"] == 2 and c["line_acc_raw"] == 0.0 and c["n_exact_norm"] == 0
    # NED: 1 - mean(2/15, 1/4)
    assert c["ned_raw"] == pytest.approx(1 - (2 / 15 + 1 / 4) / 2) and round(c["ned_norm"], 4) == 0.8083
    # Line CERs 2/14 and 1/4: mean = median of two values = 11/56.
    assert c["mean_line_cer_raw"] == pytest.approx(11 / 56)
    assert c["median_line_cer_norm"] == pytest.approx(11 / 56)
    assert c["max_line_cer_norm"] == pytest.approx(0.25)
    assert c["confusion_pairs"] == [{"ref": "票", "hyp": "要", "count": 1}]
    assert c["error_kinds"] == {k: 0 for k in ERROR_KINDS}  # an S+I line and a D line: no named kind
    l0, l1 = lines
    assert (l0["substitutions_raw"], l0["deletions_raw"], l0["insertions_raw"], l0["edits_raw"]) == (
        1,
        0,
        1,
        2,
    )
    assert (l1["substitutions_norm"], l1["deletions_norm"], l1["insertions_norm"]) == (0, 1, 0)
    assert l0["cer_raw"] == pytest.approx(1 / 7) and l1["cer_norm"] == pytest.approx(0.25)
    assert l0["ned_norm"] == pytest.approx(13 / 15) and l1["ned_raw"] == pytest.approx(0.75)
    assert l0["length_ratio"] == pytest.approx(15 / 14) and l1["length_ratio"] == pytest.approx(0.75)
    assert l0["reference"] == refs[0] and l0["hypothesis"] == hyps[0] and l0["ref_chars_norm"] == 14


def test_per_line_keys_and_json():
    c, lines = score(["中 国", ""], ["中国", "abc"])
    json.dumps(c, allow_nan=False)  # strict JSON: no NaN anywhere
    json.dumps(lines, allow_nan=False, ensure_ascii=False)
    expected = {
        "reference",
        "hypothesis",
        "reference_norm",
        "hypothesis_norm",
        "ref_chars_norm",
        "error_kinds",
        "length_ratio",
    }
    for k in ("raw", "norm"):
        expected |= {
            f"{m}_{k}" for m in ("cer", "substitutions", "deletions", "insertions", "edits", "ned", "exact")
        }
    assert set(lines[0]) == expected
    assert "id" not in lines[0]  # the caller adds ids


def test_inner_space_counts_raw_not_norm():
    c, (line,) = score(["中 国"], ["中国"])
    assert c["cer_raw"] == pytest.approx(1 / 3) and c["cer_norm"] == 0.0
    assert line["deletions_raw"] == 1 and line["deletions_norm"] == 0
    assert line["exact_raw"] is False and line["exact_norm"] is True
    assert line["error_kinds"] == []  # exact after normalisation
    # Raw strips only outer whitespace (jiwer's default).
    assert one(" 物流很快\n", "物流很快")["cer_raw"] == 0.0


def test_full_width_raw_differs_from_norm():
    ref, hyp = "金额：￥１２８．００　元", "金额:¥128.00元"
    c, (line,) = score([ref], [hyp])
    # Raw: 12 vs 11 chars; 金额…元 hit, 8 substitutions (：￥１２８．００ → :¥128.00), U+3000 deleted.
    assert c["ref_chars_raw"] == 12 and c["ref_chars_norm"] == 11 and c["hyp_chars_raw"] == 11
    assert (c["hits_raw"], c["substitutions_raw"], c["deletions_raw"], c["insertions_raw"]) == (3, 8, 1, 0)
    assert c["cer_raw"] == pytest.approx(9 / 12)
    assert c["cer_norm"] == 0.0 and line["exact_norm"] and not line["exact_raw"]
    assert c["line_acc_raw"] == 0.0 and c["line_acc_norm"] == 1.0
    # ￥ vs ¥ alone: one raw substitution, nothing after NFKC.
    assert one("￥5", "¥5")["cer_raw"] == 0.5 and one("￥5", "¥5")["cer_norm"] == 0.0
    # With NFKC off the yen pair is a confusion pair.
    c2, _ = score(["￥5"], ["¥5"], normalize_cfg=NormalizeConfig(nfkc=False))
    assert c2["cer_norm"] == 0.5 and c2["confusion_pairs"] == [{"ref": "￥", "hyp": "¥", "count": 1}]


def test_empty_reference():
    # jiwer's own convention, kept: edits over max(ref chars, 1).
    c, (line,) = score([""], ["abc"])
    assert jiwer.cer([""], ["abc"]) == 3.0
    assert c["cer_raw"] == 3.0 and c["ref_chars_raw"] == 0 and c["insertions_raw"] == 3
    assert line["cer_raw"] == 3.0 and line["ned_raw"] == 0.0 and line["length_ratio"] is None
    assert line["error_kinds"] == ["over_generation"]
    assert c["n_empty_refs_raw"] == 1 and c["n_empty_hyps_raw"] == 0
    # In a corpus: insertions are edits over zero reference chars; the line stays in mean/median.
    c, lines = score(["物流很快", ""], ["物流很快", "abc"])
    assert c["cer_norm"] == pytest.approx(3 / 4)
    assert c["mean_line_cer_norm"] == pytest.approx(1.5) and c["median_line_cer_norm"] == pytest.approx(1.5)
    assert c["n_empty_refs_norm"] == 1 and c["line_acc_norm"] == 0.5
    # A whitespace-only reference is empty after stripping.
    assert one(" 　", "好")["cer_raw"] == 1.0


def test_empty_hypothesis():
    c, (line,) = score(["物流很快"], [""])
    assert c["cer_raw"] == 1.0 and c["deletions_raw"] == 4 and c["hits_raw"] == 0
    assert line["cer_norm"] == 1.0 and line["ned_norm"] == 0.0 and line["length_ratio"] == 0.0
    assert line["error_kinds"] == ["under_generation"]
    assert c["n_empty_hyps_norm"] == 1


def test_both_empty():
    c, (line,) = score([""], [""])
    assert c["cer_raw"] == 0.0 and c["cer_norm"] == 0.0 and c["ned_norm"] == 1.0 and c["line_acc_raw"] == 1.0
    assert (
        line["cer_raw"] == 0.0 and line["ned_raw"] == 1.0 and line["exact_raw"] and line["error_kinds"] == []
    )
    assert line["length_ratio"] is None
    assert c["n_empty_refs_raw"] == 1 and c["n_empty_hyps_raw"] == 1


def test_no_lines():
    c, lines = score([], [])
    assert lines == [] and c["n_lines"] == 0 and c["cer_raw"] == 0.0 and c["line_acc_norm"] == 0.0
    json.dumps(c, allow_nan=False)


def test_mean_median_line_cer_above_one():
    c, lines = score(["好", "物流很快", "你好"], ["好好好好好好", "物流很快", "你"])
    assert [pl["cer_norm"] for pl in lines] == [5.0, 0.0, 0.5]
    assert c["cer_norm"] == pytest.approx(6 / 7)  # corpus: total edits / total ref chars
    assert c["mean_line_cer_norm"] == pytest.approx(5.5 / 3)
    assert c["median_line_cer_norm"] == 0.5
    assert c["max_line_cer_norm"] == 5.0


def test_ned_values():
    # ICDAR-2019: 1 - ED/max(|pred|,|gt|), averaged; both-empty → distance 0.
    c, lines = score(["物流很快", "你好", ""], ["物流快", "你好啊啊", ""])
    assert [pl["ned_norm"] for pl in lines] == pytest.approx([0.75, 0.5, 1.0])
    assert c["ned_norm"] == pytest.approx(0.75)


def test_input_validation():
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="must be str"):
        score(["a"], [None])


def test_deterministic():
    args = (["他很瘦", "点心", "物流很快"], ["他很廋", "典心", "很快物流"])
    assert score(*args) == score(*args)


# ---------------------------------------------------------------------------------------------------------
# Error kinds
# ---------------------------------------------------------------------------------------------------------


def test_repetition_loop():
    # Unit "很好" ×4 after the text: the model's runaway loop (DeepSeek-OCR #151).
    line = one("今天天气很好", "今天天气很好很好很好很好")
    assert line["error_kinds"] == ["repetition_loop", "over_generation"]
    assert line["cer_norm"] == 1.0 and line["length_ratio"] == 2.0
    # One character ×5 in a row.
    assert one("好", "好好好好好")["error_kinds"] == ["repetition_loop", "over_generation"]
    # Non-consecutive repetition in a long output: "AB" ×4 and hyp > 1.5 × ref.
    line = one("ABCD", "AB1AB2AB3AB4")
    assert line["error_kinds"] == ["repetition_loop", "over_generation"]
    assert (line["substitutions_norm"], line["insertions_norm"]) == (2, 8)
    # A run that is in the reference is text, not a loop.
    assert one("他说哈哈哈哈哈哈真好", "他说哈哈哈哈哈哈真妤")["error_kinds"] == ["substitution_only"]
    # Below the thresholds: "额" twice.
    assert one("海信发票金额", "海信发票金额额")["error_kinds"] == []
    # Thresholds are fields.
    strict = ErrorKindConfig(
        loop_min_char_run=6, loop_ngram_count=5
    )  # "好好" occurs 4 times: the n-gram rule
    assert one("好", "好好好好好", error_cfg=strict)["error_kinds"] == ["over_generation"]
    c, _ = score(["今天天气很好", "好", "你好"], ["今天天气很好很好很好很好", "好", "你好"])
    assert c["error_kinds"]["repetition_loop"] == 1 and c["loop_rate"] == pytest.approx(1 / 3)


def test_prompt_echo():
    line = one("你好", "图片内容是：你好")
    assert line["error_kinds"] == ["prompt_echo", "over_generation"]
    assert line["hypothesis_norm"] == "图片内容是:你好" and line["length_ratio"] == 4.0
    line = one("物流很快", "Free OCR.")
    assert line["error_kinds"] == ["prompt_echo", "over_generation"]
    assert line["cer_norm"] == 2.0  # "FreeOCR." 8 chars vs 4: 4 S + 4 I
    assert one("物流很快", "free ocr 物流很快")["error_kinds"][0] == "prompt_echo"  # case-insensitive
    # The caller's prompt: each of its lines is a phrase; not an echo without it.
    prompt = ("<image>\n识别文字。",)
    assert one("物流很快", "识别文字。物流很快", prompt_phrases=prompt)["error_kinds"] == [
        "prompt_echo",
        "over_generation",
    ]
    assert one("物流很快", "识别文字。物流很快")["error_kinds"] == ["over_generation"]
    assert one("物流很快", "<image>物流很快")["error_kinds"] == ["prompt_echo", "over_generation"]
    # Boilerplate list configurable; a phrase that is in the reference is not an echo.
    assert one("请输入密码", "请输入密玛")["error_kinds"] == ["substitution_only"]
    assert one("你好", "图片内容是你好", error_cfg=ErrorKindConfig(boilerplate=()))["error_kinds"] == [
        "over_generation"
    ]


def test_over_under_generation():
    assert one("物流很快", "物流很快递到了")["error_kinds"] == ["over_generation"]  # 7/4 = 1.75
    assert one("物流很快递到了", "物流")["error_kinds"] == ["under_generation"]  # 2/7
    assert one("物流", "物流快")["error_kinds"] == []  # 1.5 is not above 1.5
    assert one("物流很快", "物流")["error_kinds"] == []  # 0.5 is not below 0.5
    assert one("物流很快", "物流很快递到了", error_cfg=ErrorKindConfig(over_ratio=2.0))["error_kinds"] == []
    with pytest.raises(ValueError, match="under_ratio"):
        ErrorKindConfig(under_ratio=1.5)


def test_order_error():
    line = one("物流很快", "很快物流")
    assert line["error_kinds"] == ["order_error"]
    assert line["cer_norm"] == 1.0 and line["ned_norm"] == 0.0
    assert (line["substitutions_norm"], line["deletions_norm"], line["insertions_norm"]) == (0, 2, 2)


def test_substitution_shape_confusion_and_pairs():
    c, lines = score(["他很瘦", "点心", "点菜", "物流很快"], ["他很廋", "典心", "典菜", "物流很怏"])
    assert [pl["error_kinds"] for pl in lines] == [
        ["substitution_only", "shape_confusion"],
        ["substitution_only", "shape_confusion"],
        ["substitution_only", "shape_confusion"],
        ["substitution_only"],  # 快/怏 is not in the seed pair list
    ]
    assert c["confusion_pairs"] == [
        {"ref": "点", "hyp": "典", "count": 2},
        {"ref": "快", "hyp": "怏", "count": 1},
        {"ref": "瘦", "hyp": "廋", "count": 1},
    ]
    assert c["error_kinds"]["shape_confusion"] == 3 and c["error_kind_rates"]["substitution_only"] == 1.0
    assert c["n_lines_with_error_kinds"] == 4
    # Direction does not matter for shape pairs; top_confusions cuts the list.
    assert one("他很廋", "他很瘦")["error_kinds"] == ["substitution_only", "shape_confusion"]
    assert len(score(["点心", "他很瘦"], ["典心", "他很廋"], top_confusions=1)[0]["confusion_pairs"]) == 1
    # Custom pair list.
    assert one("物流很快", "物流很怏", error_cfg=ErrorKindConfig(shape_pairs=(("快", "怏"),)))[
        "error_kinds"
    ] == [
        "substitution_only",
        "shape_confusion",
    ]


def test_exact_lines_have_no_kinds_and_rates_cover_all_kinds():
    c, lines = score(["物流很快", "好好好好好"], ["物流很快", "好好好好好"])
    assert all(pl["error_kinds"] == [] for pl in lines)
    assert list(c["error_kinds"]) == list(ERROR_KINDS) and set(c["error_kind_rates"].values()) == {0.0}


# ---------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------


def test_perplexity():
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(0.0, 3) == 1.0
    # Summed over the split, not a mean of batch means: batches of 1 and 4 tokens with NLL sums 2.0 and 2.0.
    assert perplexity(2.0 + 2.0, 1 + 4) == pytest.approx(math.exp(0.8))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="positive int"):
        perplexity(1.0, 2.5)
    with pytest.raises(ValueError, match="finite"):
        perplexity(float("nan"), 3)
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(-1.0, 3)


def test_error_kind_config_is_plain_data():
    from dataclasses import asdict

    json.dumps(asdict(ErrorKindConfig()), ensure_ascii=False)  # can go into a saved config / metrics.json
    with pytest.raises(ValueError, match="two different characters"):
        ErrorKindConfig(shape_pairs=(("快", "快"),))
    with pytest.raises(ValueError, match="loop_min_unit"):
        ErrorKindConfig(loop_min_unit=0)
