"""Text-line recognition metrics: CER (raw and normalised), NED, line accuracy, error kinds, perplexity.

One function, :func:`score_lines`, scores a whole split and returns a corpus dict (JSON-serialisable,
written as ``metrics.json``) and one dict per line (written as ``predictions.jsonl``). The eval scripts,
the comparison report and the peer engines (Tesseract, RapidOCR) all go through it, so their numbers
are comparable by construction.

Definitions (docs/MODEL_NOTES.md §7):

* **CER** = total character edits (S + D + I) / total reference characters, summed over the corpus, never
  a mean of line CERs; computed with ``jiwer.process_characters`` (jiwer 4). ``evaluate.load("cer")`` is
  not used: it needs the hub even offline.
* **raw** strips only leading/trailing whitespace (jiwer's ``cer_default``), so ``cer_raw`` equals
  ``jiwer.cer(refs, hyps)``; inner spaces count (``"中 国"`` vs ``"中国"`` is one deletion).
  **norm** applies :class:`NormalizeConfig` first (NFKC, no whitespace by default), see :func:`describe`.
* **NED** as FudanVI / ICDAR-2019 report it: ``1 - mean(ED / max(|pred|, |gt|))`` (higher is better); a line
  whose prediction and reference are both empty has distance 0.
* **Empty references** (after the respective normalisation): their insertions count as edits over zero
  reference characters at corpus level (so corpus CER stays total edits / total reference characters).
  A line's CER is ``edits / max(|ref|, 1)``: 0.0 when both are empty, ``len(hyp)`` when only the reference
  is empty. That is jiwer's own convention (``cer([''], ['abc']) == 3.0``) and we keep such lines in the
  mean/median on purpose: text hallucinated on a blank line is an error we want to see, not drop. Their
  number is reported (``n_empty_refs_*``). A corpus with zero reference characters uses the same
  ``max(., 1)`` denominator instead of dividing by zero.
* **Empty hypotheses** are all deletions (line CER 1.0).

jiwer 3.x raised on empty strings; we never hand it one (empty sides are scored here directly), so the
result does not depend on that jiwer behaviour.

Traditional → simplified conversion (FudanVI's ``equal`` does it) is not offered: no converter is pinned in
this project's requirements. Add it as a ``NormalizeConfig`` field once one is (e.g. ``opencc``).
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass

import jiwer

# Error kinds, in the order they are reported. A line may have several; an exact (normalised) line has none.
ERROR_KINDS = (
    "repetition_loop",
    "prompt_echo",
    "over_generation",
    "under_generation",
    "order_error",
    "substitution_only",
    "shape_confusion",
)

# Boilerplate a VLM OCR model emits instead of (or around) the text: the DeepSeek-OCR prompt pieces, chat
# special tokens, and Chinese "the picture says ..." preambles.
DEFAULT_BOILERPLATE = (
    "Free OCR",
    "<image>",
    "<|grounding|>",
    "<|ref|>",
    "<|det|>",
    "请输入",
    "图片内容是",
    "图片中的文字",
    "图中文字",
)

# A seed list of glyph pairs that look alike in print; a substitution between the two members (either
# direction) is a ``shape_confusion``. Extend it from the confusion pairs a report shows.
DEFAULT_SHAPE_PAIRS = (
    ("瘦", "廋"),
    ("点", "典"),
    ("己", "已"),
    ("已", "巳"),
    ("己", "巳"),
    ("未", "末"),
    ("土", "士"),
    ("日", "曰"),
    ("人", "入"),
    ("大", "太"),
    ("太", "犬"),
    ("戊", "戌"),
    ("戌", "戍"),
    ("拨", "拔"),
    ("候", "侯"),
    ("析", "折"),
    ("千", "干"),
    ("于", "干"),
    ("免", "兔"),
    ("鸟", "乌"),
    ("0", "O"),
    ("1", "l"),
)


# --------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizeConfig:
    """Which normalisations produce the ``*_norm`` metrics; applied in field order.

    Attributes:
        nfkc: Unicode NFKC. Maps full-width ASCII (U+FF01–FF5E, e.g. ``，`` → ``,``, ``１`` → ``1``) and
            ideographic space U+3000 to their half-width forms, ``￥`` → ``¥``, and other compatibility forms
            (``①`` → ``1``, ``…`` → ``...``). CJK punctuation without a half-width form (``。、「」``) is kept.
        remove_whitespace: Drop every whitespace character (after NFKC, so U+3000 goes too). Chinese has no
            word spaces; engines insert them between CJK and Latin runs or between every glyph (Tesseract).
        lowercase: ``str.lower`` (off by default: case is part of codes like ``LED46EC3``). FudanVI's accuracy
            lower-cases; turn it on to compare with them.
    """

    nfkc: bool = True
    remove_whitespace: bool = True
    lowercase: bool = False


_WHITESPACE = re.compile(r"\s+")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    """Apply the enabled normalisations of ``cfg`` to ``text``, in the order of :func:`describe`.

    Args:
        text: A reference or hypothesis line.
        cfg: Which steps to apply.

    Returns:
        The normalised line, stripped of leading/trailing whitespace (as raw scoring is).
    """
    if cfg.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if cfg.remove_whitespace:
        text = _WHITESPACE.sub("", text)
    if cfg.lowercase:
        text = text.lower()
    return text.strip()


def describe(cfg: NormalizeConfig) -> str:
    """Name the normalisation steps of ``cfg`` in the order they are applied.

    Args:
        cfg: The normalisation config.

    Returns:
        E.g. ``"NFKC (full→half width, U+3000→space, ￥→¥) → remove whitespace"``, or ``"none (strip only)"``.
    """
    steps = []
    if cfg.nfkc:
        steps.append("NFKC (full→half width, U+3000→space, ￥→¥)")
    if cfg.remove_whitespace:
        steps.append("remove whitespace")
    if cfg.lowercase:
        steps.append("lowercase")
    return " → ".join(steps) if steps else "none (strip only)"


# --------------------------------------------------------------------------------------------------------
# Edit alignment (jiwer), guarded against empty strings
# --------------------------------------------------------------------------------------------------------


@dataclass
class _LineEdits:
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    # (ref_char, hyp_char) for each substituted position, in line order.
    sub_pairs: list[tuple[str, str]]

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def _align(refs: list[str], hyps: list[str]) -> list[_LineEdits]:
    """Character alignment of each (ref, hyp) pair; inputs are already stripped/normalised."""
    out: list[_LineEdits | None] = [None] * len(refs)
    # Lines with an empty side are trivial (all insertions or all deletions); keep them away from jiwer,
    # whose handling of empty strings changed between versions (3.x raised).
    todo = []
    for i, (r, h) in enumerate(zip(refs, hyps, strict=True)):
        if not r or not h:
            out[i] = _LineEdits(0, 0, len(r), len(h), [])
        else:
            todo.append(i)
    if todo:
        # Chars only, no Strip: the caller decided what "raw" and "norm" mean.
        chars = jiwer.ReduceToListOfListOfChars()
        o = jiwer.process_characters(
            [refs[i] for i in todo],
            [hyps[i] for i in todo],
            reference_transform=chars,
            hypothesis_transform=chars,
        )
        for i, chunks in zip(todo, o.alignments, strict=True):
            e = _LineEdits(0, 0, 0, 0, [])
            for c in chunks:
                n_ref, n_hyp = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
                if c.type == "equal":
                    e.hits += n_ref
                elif c.type == "substitute":
                    e.substitutions += n_ref
                    # A substitute chunk pairs ref and hyp positions one to one.
                    e.sub_pairs += zip(
                        refs[i][c.ref_start_idx : c.ref_end_idx],
                        hyps[i][c.hyp_start_idx : c.hyp_end_idx],
                        strict=True,
                    )
                elif c.type == "delete":
                    e.deletions += n_ref
                elif c.type == "insert":
                    e.insertions += n_hyp
                else:
                    raise ValueError(f"unknown jiwer alignment chunk type {c.type!r}")
            out[i] = e
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------
# Error kinds
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorKindConfig:
    """Thresholds of the per-line error kinds (all checked on the normalised strings).

    Rules (a line may have several kinds; an exact line has none):

    * ``repetition_loop``: the hypothesis holds a unit of ``loop_min_unit``–``loop_max_unit`` characters
      repeated at least ``loop_min_repeats`` times in a row, or one character repeated at least
      ``loop_min_char_run`` times in a row, and that run is not in the reference (``哈哈哈`` in the reference
      is text, not a loop); or the hypothesis is longer than ``loop_long_ratio`` × the reference and some
      ``loop_ngram``-gram occurs at least ``loop_ngram_count`` times in it but fewer times in the reference.
      DeepSeek-OCR's known failure (deepseek-ai/DeepSeek-OCR#151, 9.2 % of pages).
    * ``prompt_echo``: the hypothesis contains a prompt phrase or one of ``boilerplate`` (case-insensitive,
      after the same normalisation) that the reference does not contain.
    * ``over_generation`` / ``under_generation``: ``len(hyp) / len(ref)`` above ``over_ratio`` / below
      ``under_ratio``. An empty reference with a non-empty hypothesis is over-generation; an empty hypothesis
      for a non-empty reference is under-generation.
    * ``order_error``: the same multiset of characters in a different order.
    * ``substitution_only``: only substitutions (no insertion, no deletion).
    * ``shape_confusion``: a substitution between the members of a pair in ``shape_pairs`` (either way).

    Attributes:
        loop_min_unit: Shortest repeated unit (characters) for the consecutive-repeat rule.
        loop_max_unit: Longest repeated unit searched (bounds the cost on long runaway outputs).
        loop_min_repeats: Consecutive repeats of a multi-character unit that make a loop.
        loop_min_char_run: Consecutive repeats of a single character that make a loop.
        loop_long_ratio: Length ratio above which repeated n-grams alone make a loop.
        loop_ngram: n of the n-gram counted by the long-output rule.
        loop_ngram_count: Occurrences of one n-gram that make a long output a loop.
        boilerplate: Phrases that are never the text of a line (besides the caller's prompt phrases).
        over_ratio: Length ratio above which a line is over-generated.
        under_ratio: Length ratio below which a line is under-generated.
        shape_pairs: Unordered pairs of shape-similar characters.
    """

    loop_min_unit: int = 2
    loop_max_unit: int = 32
    loop_min_repeats: int = 3
    loop_min_char_run: int = 5
    loop_long_ratio: float = 1.5
    loop_ngram: int = 2
    loop_ngram_count: int = 4
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    over_ratio: float = 1.5
    under_ratio: float = 0.5
    shape_pairs: tuple[tuple[str, str], ...] = DEFAULT_SHAPE_PAIRS

    def __post_init__(self) -> None:
        if not 1 <= self.loop_min_unit <= self.loop_max_unit:
            raise ValueError(
                f"need 1 <= loop_min_unit <= loop_max_unit, got {self.loop_min_unit}, {self.loop_max_unit}"
            )
        if self.loop_min_repeats < 2 or self.loop_min_char_run < 2:
            raise ValueError(
                "loop_min_repeats and loop_min_char_run must be >= 2 (one occurrence is no repeat)"
            )
        if not 0 <= self.under_ratio <= 1 <= self.over_ratio:
            raise ValueError(
                f"need 0 <= under_ratio <= 1 <= over_ratio, got {self.under_ratio}, {self.over_ratio}"
            )
        bad = [p for p in self.shape_pairs if len(p) != 2 or p[0] == p[1]]
        if bad:
            raise ValueError(f"shape_pairs must be pairs of two different characters, got {bad}")


def _consecutive_runs(hyp: str, ek: ErrorKindConfig) -> list[str]:
    """Runs of a repeated unit in ``hyp`` (whole run text), per the two consecutive-repeat rules."""
    runs = []
    # Backreference search: (unit)(unit){m-1,}. Non-greedy unit so "abababab" reports unit "ab".
    multi = re.compile(
        rf"(.{{{ek.loop_min_unit},{ek.loop_max_unit}}}?)\1{{{ek.loop_min_repeats - 1},}}", re.S
    )
    single = re.compile(rf"(.)\1{{{ek.loop_min_char_run - 1},}}", re.S)
    for pat in (multi, single):
        runs += [m.group(0) for m in pat.finditer(hyp)]
    return runs


def _is_loop(ref: str, hyp: str, ek: ErrorKindConfig) -> bool:
    if any(run not in ref for run in _consecutive_runs(hyp, ek)):
        return True
    # Long runaway output whose repetition is not back-to-back (e.g. "ABCxABCyABC...").
    if len(hyp) > ek.loop_long_ratio * max(len(ref), 1) and len(hyp) >= ek.loop_ngram:
        n = ek.loop_ngram
        hyp_grams = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        ref_grams = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        gram, count = max(hyp_grams.items(), key=lambda kv: (kv[1], kv[0]))
        if count >= ek.loop_ngram_count and count > ref_grams[gram]:
            return True
    return False


def _error_kinds(
    ref: str,
    hyp: str,
    edits: _LineEdits,
    echo_phrases: tuple[str, ...],
    shape_set: frozenset[frozenset[str]],
    ek: ErrorKindConfig,
) -> list[str]:
    """Error kinds of one normalised line, in :data:`ERROR_KINDS` order."""
    if ref == hyp:
        return []
    kinds = []
    if _is_loop(ref, hyp, ek):
        kinds.append("repetition_loop")
    hyp_cf, ref_cf = hyp.casefold(), ref.casefold()
    if any(p in hyp_cf and p not in ref_cf for p in echo_phrases):
        kinds.append("prompt_echo")
    if not ref:
        kinds.append("over_generation")  # hyp is non-empty here, since ref != hyp
    else:
        ratio = len(hyp) / len(ref)
        if ratio > ek.over_ratio:
            kinds.append("over_generation")
        if ratio < ek.under_ratio:
            kinds.append("under_generation")
    if sorted(ref) == sorted(hyp):
        kinds.append("order_error")
    if edits.substitutions and not edits.deletions and not edits.insertions:
        kinds.append("substitution_only")
    if any(frozenset(p) in shape_set for p in edits.sub_pairs):
        kinds.append("shape_confusion")
    return kinds


def _echo_phrases(
    prompt_phrases: tuple[str, ...], ek: ErrorKindConfig, cfg: NormalizeConfig
) -> tuple[str, ...]:
    """Prompt phrases split into lines, plus boilerplate, normalised like the hypotheses and case-folded."""
    # "<image>\nFree OCR. " echoes as separate pieces, so each line of a prompt is its own phrase.
    pieces = [line for p in prompt_phrases for line in p.splitlines()] + list(ek.boilerplate)
    phrases = {normalize(p, cfg).casefold() for p in pieces}
    phrases.discard("")
    return tuple(sorted(phrases))


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------


def _line_cer(e: _LineEdits, ref_len: int) -> float:
    # max(., 1): an empty reference scores its insertions (jiwer's convention), see the module docstring.
    return e.edits / max(ref_len, 1)


def _line_ned(e: _LineEdits, ref_len: int, hyp_len: int) -> float:
    # ICDAR-2019: 1 - ED / max(|pred|, |gt|); both empty is a perfect line.
    longest = max(ref_len, hyp_len)
    return 1.0 - e.edits / longest if longest else 1.0


def score_lines(
    refs: list[str],
    hyps: list[str],
    *,
    normalize_cfg: NormalizeConfig,
    prompt_phrases: tuple[str, ...] = (),
    error_cfg: ErrorKindConfig | None = None,
    top_confusions: int = 20,
) -> tuple[dict, list[dict]]:
    """Score hypotheses against references, raw and normalised, at corpus and line level.

    Args:
        refs: Reference lines.
        hyps: Hypothesis lines, one per reference, same order.
        normalize_cfg: Normalisation of the ``*_norm`` metrics and of everything the error kinds look at.
        prompt_phrases: The prompt(s) the model was given; each line of each is a ``prompt_echo`` phrase.
        error_cfg: Error-kind thresholds; ``ErrorKindConfig()`` if None.
        top_confusions: How many (ref char → hyp char) substitution pairs to keep.

    Returns:
        ``(corpus, per_line)``. ``corpus`` (JSON-serialisable) has, with ``X`` in ``raw``/``norm``:
        ``normalization`` (the :func:`describe` string), ``n_lines``, ``cer_X`` (corpus level),
        ``hits_X``, ``substitutions_X``, ``deletions_X``, ``insertions_X``, ``edits_X``, ``ref_chars_X``,
        ``hyp_chars_X``, ``line_acc_X`` (exact-match rate), ``n_exact_X``, ``ned_X`` (1 - mean normalised
        edit distance), ``mean_line_cer_X``, ``median_line_cer_X``, ``max_line_cer_X``, ``n_empty_refs_X``,
        ``n_empty_hyps_X``; ``error_kinds`` (kind → line count, every kind present), ``error_kind_rates``
        (kind → share of lines), ``n_lines_with_errors_kinds``, ``loop_rate`` (= rate of
        ``repetition_loop``), ``confusion_pairs`` (list of ``{"ref", "hyp", "count"}`` from normalised
        substitutions, most frequent first, ties by characters).

        ``per_line`` has one dict per line: ``reference``, ``hypothesis`` (as given), ``reference_norm``,
        ``hypothesis_norm``, ``ref_chars_norm``, ``cer_raw``, ``cer_norm``, ``substitutions_X``,
        ``deletions_X``, ``insertions_X``, ``edits_X``, ``ned_raw``, ``ned_norm`` (1 - ED/max len),
        ``exact_raw``, ``exact_norm``, ``error_kinds`` (list, :data:`ERROR_KINDS` order), ``length_ratio``
        (normalised ``len(hyp)/len(ref)``, None for an empty reference).

    Raises:
        ValueError: If ``refs`` and ``hyps`` differ in length, or an item is not a ``str``.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps differ in length: {len(refs)} vs {len(hyps)}")
    for name, seq in (("refs", refs), ("hyps", hyps)):
        bad = [i for i, s in enumerate(seq) if not isinstance(s, str)]
        if bad:
            raise ValueError(f"{name} items must be str; not at indices {bad[:10]} (e.g. {seq[bad[0]]!r})")
    ek = error_cfg or ErrorKindConfig()

    # "raw" = jiwer's default CER transform: strip outer whitespace, nothing else.
    forms = {
        "raw": ([r.strip() for r in refs], [h.strip() for h in hyps]),
        "norm": ([normalize(r, normalize_cfg) for r in refs], [normalize(h, normalize_cfg) for h in hyps]),
    }
    edits = {k: _align(*v) for k, v in forms.items()}
    echo = _echo_phrases(tuple(prompt_phrases), ek, normalize_cfg)
    shape_set = frozenset(frozenset(p) for p in ek.shape_pairs)  # unordered: 瘦→廋 and 廋→瘦 both count

    per_line = []
    for i, (ref, hyp) in enumerate(zip(refs, hyps, strict=True)):
        rn, hn = forms["norm"][0][i], forms["norm"][1][i]
        line = {
            "reference": ref,
            "hypothesis": hyp,
            "reference_norm": rn,
            "hypothesis_norm": hn,
            "ref_chars_norm": len(rn),
        }
        for k, (rs, hs) in forms.items():
            e = edits[k][i]
            line[f"cer_{k}"] = _line_cer(e, len(rs[i]))
            line[f"substitutions_{k}"] = e.substitutions
            line[f"deletions_{k}"] = e.deletions
            line[f"insertions_{k}"] = e.insertions
            line[f"edits_{k}"] = e.edits
            line[f"ned_{k}"] = _line_ned(e, len(rs[i]), len(hs[i]))
            line[f"exact_{k}"] = rs[i] == hs[i]
        line["error_kinds"] = _error_kinds(rn, hn, edits["norm"][i], echo, shape_set, ek)
        line["length_ratio"] = len(hn) / len(rn) if rn else None
        per_line.append(line)

    n = len(refs)
    corpus: dict = {"normalization": describe(normalize_cfg), "n_lines": n}
    for k, (rs, hs) in forms.items():
        es = edits[k]
        ref_chars = sum(map(len, rs))
        total = {
            f: sum(getattr(e, f) for e in es) for f in ("hits", "substitutions", "deletions", "insertions")
        }
        n_edits = total["substitutions"] + total["deletions"] + total["insertions"]
        line_cers = [pl[f"cer_{k}"] for pl in per_line]
        n_exact = sum(pl[f"exact_{k}"] for pl in per_line)
        corpus |= {
            # Corpus CER: total edits over total reference characters (max(., 1) only for an all-empty split).
            f"cer_{k}": n_edits / max(ref_chars, 1),
            **{f"{f}_{k}": v for f, v in total.items()},
            f"edits_{k}": n_edits,
            f"ref_chars_{k}": ref_chars,
            f"hyp_chars_{k}": sum(map(len, hs)),
            f"n_exact_{k}": n_exact,
            f"line_acc_{k}": n_exact / n if n else 0.0,
            f"ned_{k}": statistics.fmean(pl[f"ned_{k}"] for pl in per_line) if n else 0.0,
            # Line CER can exceed 1 (insertions, loops): the mean is pulled by outliers, so give the median too.
            f"mean_line_cer_{k}": statistics.fmean(line_cers) if n else 0.0,
            f"median_line_cer_{k}": float(statistics.median(line_cers)) if n else 0.0,
            f"max_line_cer_{k}": max(line_cers, default=0.0),
            f"n_empty_refs_{k}": sum(not r for r in rs),
            f"n_empty_hyps_{k}": sum(not h for h in hs),
        }

    kind_counts = Counter(kind for pl in per_line for kind in pl["error_kinds"])
    corpus["error_kinds"] = {kind: kind_counts[kind] for kind in ERROR_KINDS}
    corpus["error_kind_rates"] = {kind: (kind_counts[kind] / n if n else 0.0) for kind in ERROR_KINDS}
    corpus["n_lines_with_error_kinds"] = sum(bool(pl["error_kinds"]) for pl in per_line)
    corpus["loop_rate"] = corpus["error_kind_rates"]["repetition_loop"]  # loops are the most reported failure of the base model

    pairs = Counter(p for e in edits["norm"] for p in e.sub_pairs)
    # Deterministic order: count desc, then the characters.
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_confusions]
    corpus["confusion_pairs"] = [{"ref": r, "hyp": h, "count": c} for (r, h), c in top]
    return corpus, per_line


# --------------------------------------------------------------------------------------------------------
# Metrics per tag (domain, level, degradation, length bucket)
# --------------------------------------------------------------------------------------------------------

# Tag keys in report order; ``degradations`` is a "+"-joined list: a line counts under each of its ops.
TAG_KEYS = ("domain", "level", "degradations", "length")
MULTI_VALUED_TAGS = {"degradations": "+"}
# Values with a natural order (levels, length buckets) come in that order; others alphabetically.
TAG_VALUE_ORDER = ("clean", "mild", "medium", "hard", "1-5", "6-10", "11-15", "16-20", "21+", "none")


def _tag_values(key: str, value) -> list[str]:
    if value is None:
        return []
    sep = MULTI_VALUED_TAGS.get(key)
    return [v for v in str(value).split(sep) if v] if sep else [str(value)]


def _order(value: str) -> tuple[int, str]:
    return (TAG_VALUE_ORDER.index(value), "") if value in TAG_VALUE_ORDER else (len(TAG_VALUE_ORDER), value)


def metrics_by_tag(per_line: list[dict], tags: list[dict | None]) -> dict[str, dict[str, dict]]:
    """CER, line accuracy and error kinds of each tag value, from :func:`score_lines`' per-line dicts.

    Args:
        per_line: ``score_lines``' second result.
        tags: One dict per line (``{"domain": "receipt", "level": "hard", "degradations": "blur+noise",
            "length": "6-10"}``, any keys), or None for a line without tags; same order as ``per_line``.

    Returns:
        ``{tag key: {value: metrics}}``, keys in :data:`TAG_KEYS` order then any others, values in
        :data:`TAG_VALUE_ORDER` order then alphabetically. ``metrics`` has ``n_lines``, ``ref_chars_X``,
        ``edits_X``, ``cer_X`` (total edits over total reference characters of those lines, as the corpus
        CER), ``line_acc_X`` (X in raw / norm), ``error_kinds`` (kind -> lines) and ``error_kind_rates``.
        A line counts once under each of its values (several for ``degradations``).

    Raises:
        ValueError: If ``tags`` and ``per_line`` differ in length.
    """
    if len(tags) != len(per_line):
        raise ValueError(f"tags and per_line differ in length: {len(tags)} vs {len(per_line)}")
    groups: dict[str, dict[str, list[dict]]] = {}
    for line, t in zip(per_line, tags, strict=True):
        for key, value in (t or {}).items():
            for v in _tag_values(key, value):
                groups.setdefault(key, {}).setdefault(v, []).append(line)
    keys = [k for k in TAG_KEYS if k in groups] + sorted(k for k in groups if k not in TAG_KEYS)
    out: dict[str, dict[str, dict]] = {}
    for key in keys:
        out[key] = {}
        for value in sorted(groups[key], key=_order):
            lines = groups[key][value]
            n = len(lines)
            m: dict = {"n_lines": n}
            for k in ("raw", "norm"):
                ref_chars = sum(len(pl["reference"].strip()) if k == "raw" else pl["ref_chars_norm"] for pl in lines)
                edits = sum(pl[f"edits_{k}"] for pl in lines)
                m |= {f"ref_chars_{k}": ref_chars, f"edits_{k}": edits, f"cer_{k}": edits / max(ref_chars, 1),
                      f"line_acc_{k}": sum(pl[f"exact_{k}"] for pl in lines) / n}
            kinds = Counter(kind for pl in lines for kind in pl["error_kinds"])
            m["error_kinds"] = {kind: kinds[kind] for kind in ERROR_KINDS}
            m["error_kind_rates"] = {kind: kinds[kind] / n for kind in ERROR_KINDS}
            out[key][value] = m
    return out


# --------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Perplexity of a split: ``exp(total_nll / total_tokens)``.

    Sum the target-token negative log-likelihoods and count the target tokens over the whole split, then
    call this once. Never average per-batch mean losses: batches hold different numbers of target tokens,
    so the mean of means weights short batches too much.

    Args:
        total_nll: Sum of per-token NLL (nats) over all target tokens of the split.
        total_tokens: Number of target tokens summed.

    Returns:
        The perplexity; ``inf`` if the mean NLL overflows ``exp``.

    Raises:
        ValueError: If ``total_tokens`` is not a positive int, or ``total_nll`` is negative or not finite.
    """
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens <= 0:
        raise ValueError(
            f"perplexity needs a positive int token count, got {total_tokens!r}: no target tokens were scored "
            "(check the label mask: every position -100?)"
        )
    if not math.isfinite(total_nll) or total_nll < 0:
        raise ValueError(f"total_nll must be a finite sum of non-negative NLLs, got {total_nll!r}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf
