"""Comparison report of several evaluated runs on the same lines: ``report.md`` plus PNG plots.

Input is what :func:`dsocr.metrics.score_lines` returns for each run (its per-line dicts also carrying the
line ``id``), e.g. the base model, the LoRA checkpoint and a peer engine::

    from dsocr.report import write_comparison_report
    path = write_comparison_report(
        [("base", base_corpus, base_lines), ("lora-1500", lora_corpus, lora_lines)], "runs/x/report"
    )

``report.md`` holds: a corpus metrics table (one column per run), error kinds per run, top confusion
pairs per run, and for each run after the first the lines that got better and worse against the first
run (normalised CER change). The plots sit beside it: ``cer_hist.png``, ``cer_by_length.png``,
``error_kinds.png``, ``confusion_pairs.png`` and, when the per-line dicts carry ``confidence_mean`` (the
mean token probability of the greedy answer, ``dsocr.generation.generate_batched``), ``reliability.png``:
line accuracy per confidence bin against the diagonal of a perfectly calibrated model, with the table and
the expected calibration error (ECE) in ``report.md``.

When the runs' corpora carry ``by_tag`` (:func:`dsocr.metrics.metrics_by_tag`, a tagged dataset such as
the hard set), ``report.md`` gains a "Metrics per tag" section (CER, line accuracy and the change against
the first run per domain, level, degradation and length bucket) and ``cer_by_tag.png``.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global backend switch
and no display needed). Chinese labels need a CJK font: :func:`find_cjk_font` looks for Noto Sans CJK
(Debian ``fonts-noto-cjk``) and others, and falls back with a warning (glyphs then render as boxes).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import statistics
import subprocess
import warnings
from pathlib import Path

import matplotlib
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dsocr.metrics import ERROR_KINDS

# (corpus key, label, format) of the metrics table, in display order. Keys missing from a run show "—".
METRIC_ROWS = (
    ("cer_raw", "CER raw", ".4f"),
    ("cer_norm", "CER norm", ".4f"),
    ("line_acc_raw", "line accuracy raw", ".4f"),
    ("line_acc_norm", "line accuracy norm", ".4f"),
    ("ned_norm", "NED norm (1 − mean ED/max len)", ".4f"),
    ("mean_line_cer_norm", "mean line CER norm", ".4f"),
    ("median_line_cer_norm", "median line CER norm", ".4f"),
    ("max_line_cer_norm", "max line CER norm", ".4f"),
    ("hits_norm", "hits norm", "d"),
    ("substitutions_norm", "substitutions norm", "d"),
    ("deletions_norm", "deletions norm", "d"),
    ("insertions_norm", "insertions norm", "d"),
    ("loop_rate", "repetition-loop rate", ".4f"),
    ("n_lines", "lines", "d"),
    ("ref_chars_norm", "reference chars norm", "d"),
    ("n_empty_refs_norm", "empty references", "d"),
    ("n_empty_hyps_norm", "empty hypotheses", "d"),
)

# Reference-length bins (normalised characters) of the CER-by-length plot: [lo, hi).
LENGTH_BINS = (
    (0, 1, "0"),
    (1, 6, "1–5"),
    (6, 11, "6–10"),
    (11, 21, "11–20"),
    (21, 41, "21–40"),
    (41, math.inf, "41+"),
)

# Per-line CER histogram: 0.1-wide bins up to 2; larger values (loops) are clipped into the last bin.
HIST_MAX = 2.0
HIST_BINS = 20

# Reliability: equal-width bins of the greedy answer's mean token probability over [0, 1]; the last bin
# is closed (a confidence of exactly 1.0 lands in it).
RELIABILITY_BINS = 10

# Fonts tried in order; Noto Sans CJK SC first (Debian fonts-noto-cjk, simplified-Chinese glyph forms).
CJK_FONT_PREFERENCE = (
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK JP",
    "Noto Serif CJK SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "AR PL UMing CN",
    "LXGW WenKai",
)


def _has_cjk_glyph(path: str) -> bool:
    try:
        from matplotlib.ft2font import FT2Font

        return FT2Font(path).get_char_index(ord("中")) != 0
    except Exception:  # an unreadable font file is simply not a candidate
        return False


@functools.cache
def find_cjk_font() -> str | None:
    """Find an installed font family that has Chinese glyphs, for plot labels.

    Looks in matplotlib's font list first, then asks fontconfig (``fc-match :lang=zh-cn``) for a file that
    matplotlib's font cache may not know (installed after the cache was built) and registers it.

    Returns:
        The family name, or None (with a warning) if no CJK font is installed.
    """
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONT_PREFERENCE:
        if name in installed:
            return name
    if shutil.which("fc-match"):
        res = subprocess.run(
            ["fc-match", "-f", "%{file}", ":lang=zh-cn"], capture_output=True, text=True, check=False
        )
        path = res.stdout.strip()
        if res.returncode == 0 and path and os.path.exists(path) and _has_cjk_glyph(path):
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name()
    warnings.warn(
        "no CJK font found: Chinese characters in the report plots will render as boxes. "
        "To fix: apt-get install fonts-noto-cjk",
        stacklevel=2,
    )
    return None


def _rc() -> dict:
    """Font settings for the plots: the CJK font first, DejaVu Sans as per-glyph fallback (Latin, digits)."""
    cjk = find_cjk_font()
    return {"font.family": ([cjk] if cjk else []) + ["DejaVu Sans"], "axes.unicode_minus": False}


# --------------------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _cell(text: str, limit: int = 60) -> str:
    """A table-safe, length-limited rendering of a line (loops can be thousands of characters)."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "\\`")
    if len(text) > limit:
        text = text[:limit] + f"…(+{len(text) - limit})"
    return text if text else "∅"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_cer_hist(names, lines_by_run, path: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    # Clip so that loops (CER ≫ 1) land in the last bin instead of stretching the axis.
    data = [[min(pl["cer_norm"], HIST_MAX) for pl in lines] for lines in lines_by_run]
    ax.hist(data, bins=HIST_BINS, range=(0, HIST_MAX), label=names)
    ax.set_xlabel(f"per-line CER (normalised; ≥ {HIST_MAX:g} clipped into the last bin)")
    ax.set_ylabel("lines")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of lines
    ax.set_title("Per-line CER")
    ax.legend()
    return _save(fig, path)


def _length_bin_cer(lines: list[dict]) -> list[tuple[float | None, int]]:
    """(corpus CER, line count) per :data:`LENGTH_BINS` bin; CER None for an empty bin."""
    out = []
    for lo, hi, _ in LENGTH_BINS:
        sel = [pl for pl in lines if lo <= pl["ref_chars_norm"] < hi]
        edits = sum(pl["edits_norm"] for pl in sel)
        ref_chars = sum(pl["ref_chars_norm"] for pl in sel)
        # Same corpus rule as metrics.score_lines: max(., 1) only matters for the empty-reference bin.
        out.append((edits / max(ref_chars, 1) if sel else None, len(sel)))
    return out


def _grouped_bars(ax, categories: list[str], names: list[str], values: list[list[float]]) -> None:
    width = 0.8 / max(len(names), 1)
    for i, (name, vals) in enumerate(zip(names, values, strict=True)):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, vals, width=width, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.legend()


def _plot_cer_by_length(names, lines_by_run, path: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    per_run = [_length_bin_cer(lines) for lines in lines_by_run]
    counts = [n for _, n in per_run[0]]  # same lines in every run, so the same counts
    cats = [f"{label}\n(n={n})" for (_, _, label), n in zip(LENGTH_BINS, counts, strict=True)]
    _grouped_bars(ax, cats, names, [[c if c is not None else 0.0 for c, _ in bins] for bins in per_run])
    ax.set_xlabel("reference length (normalised characters)")
    ax.set_ylabel("CER (total edits / reference chars)")
    ax.set_title("CER by reference length")
    return _save(fig, path)


def _plot_error_kinds(names, corpora, path: Path) -> Path:
    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    values = [[c.get("error_kind_rates", {}).get(k, 0.0) for k in ERROR_KINDS] for c in corpora]
    _grouped_bars(ax, [k.replace("_", "\n") for k in ERROR_KINDS], names, values)
    ax.set_ylabel("share of lines")
    ax.set_title("Error kinds")
    return _save(fig, path)


def _plot_confusions(names, corpora, path: Path, top: int) -> Path:
    fig = Figure(figsize=(4.2 * len(names), 0.35 * top + 1.5))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name, corpus in zip(axes, names, corpora, strict=True):
        pairs = corpus.get("confusion_pairs", [])[:top]
        labels = [f"{p['ref']}→{p['hyp']}" for p in pairs][::-1]  # most frequent at the top
        ax.barh(range(len(pairs)), [p["count"] for p in pairs][::-1])
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels(labels)
        ax.set_xlabel("count")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name if pairs else f"{name}\n(no substitutions)")
    fig.suptitle("Top confusion pairs (reference → hypothesis, normalised)")
    return _save(fig, path)


def _tag_keys(corpora) -> list[str]:
    """Tag keys present in every run's ``by_tag`` (runs on the same tagged lines have the same ones)."""
    keys = [list(c.get("by_tag") or {}) for c in corpora]
    return [k for k in keys[0] if all(k in ks for ks in keys)] if keys and all(keys) else []


def _plot_cer_by_tag(names, corpora, keys: list[str], path: Path) -> Path:
    fig = Figure(figsize=(11, 3.6 * len(keys)))
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        values = list(corpora[0]["by_tag"][key])
        counts = [corpora[0]["by_tag"][key][v]["n_lines"] for v in values]
        cats = [f"{v.replace('_', ' ')}\n(n={n})" for v, n in zip(values, counts, strict=True)]
        _grouped_bars(ax, cats, names, [[c["by_tag"][key].get(v, {}).get("cer_norm", 0.0) for v in values]
                                        for c in corpora])
        ax.set_ylabel("CER norm")
        ax.set_title(f"CER by {key}")
        ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def _tag_section(names, corpora, keys: list[str]) -> list[str]:
    """Per-tag tables: CER norm and line accuracy per run, and the change against the first run."""
    md = ["## Metrics per tag", "",
          "Lines of the tagged dataset grouped by each tag (a line counts under each of its degradations); CER "
          "= total edits / reference characters of those lines, normalised. Δ = change against "
          f"**{names[0]}** (negative CER Δ: better).", ""]
    for key in keys:
        header = [key, "lines"] + [f"CER {n}" for n in names] + [f"line acc {n}" for n in names]
        header += [f"Δ CER {n}" for n in names[1:]]
        rows = []
        for value, base in corpora[0]["by_tag"][key].items():
            ms = [c["by_tag"][key].get(value, {}) for c in corpora]
            row = [value, str(base["n_lines"])]
            row += [_fmt(m.get("cer_norm"), ".4f") for m in ms] + [_fmt(m.get("line_acc_norm"), ".4f") for m in ms]
            row += [_fmt(m["cer_norm"] - base["cer_norm"], "+.4f") if "cer_norm" in m else "—" for m in ms[1:]]
            rows.append(row)
        md += [f"### By {key}", ""] + _table(header, rows) + [""]
    return md


def reliability_bins(lines: list[dict], n_bins: int = RELIABILITY_BINS) -> tuple[list[dict], float | None]:
    """Line accuracy per confidence bin, and the expected calibration error.

    Args:
        lines: Per-line dicts with ``confidence_mean`` (None or missing lines are left out) and ``exact_norm``.
        n_bins: Equal-width bins over [0, 1].

    Returns:
        ``(bins, ece)``: one ``{"lo", "hi", "n", "confidence", "accuracy"}`` per bin (``confidence`` and
        ``accuracy`` None for an empty bin), and ECE = sum over bins of (n / N) * |accuracy - confidence|
        (None when no line has a confidence). Accuracy is the normalised exact-match rate, the report's
        "line accuracy norm".
    """
    scored = [(float(pl["confidence_mean"]), bool(pl["exact_norm"])) for pl in lines
              if pl.get("confidence_mean") is not None]
    bins = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = [(c, ok) for c, ok in scored if lo <= c < hi or (b == n_bins - 1 and c == hi)]
        bins.append({"lo": lo, "hi": hi, "n": len(sel),
                     "confidence": statistics.fmean(c for c, _ in sel) if sel else None,
                     "accuracy": sum(ok for _, ok in sel) / len(sel) if sel else None})
    if not scored:
        return bins, None
    ece = sum(b["n"] / len(scored) * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])
    return bins, ece


def _plot_reliability(names, lines_by_run, path: Path) -> Path:
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, lines in zip(names, lines_by_run, strict=True):
        bins, ece = reliability_bins(lines)
        if ece is None:  # a peer engine: no token probabilities
            continue
        full = [b for b in bins if b["n"]]
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], marker="o",
                label=f"{name} (ECE {ece:.3f})")
        for b in full:  # line counts beside the points: a bin of 2 lines says little
            ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("confidence: mean token probability of the greedy answer (bin mean)")
    ax.set_ylabel("line accuracy (normalised exact match)")
    ax.set_title("Reliability: confidence vs line accuracy")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _reliability_section(names, lines_by_run) -> list[str]:
    md = ["## Reliability (confidence vs line accuracy)", "",
          "Confidence = mean token probability of the greedy answer (EOS included); lines binned by it. A "
          "calibrated model's line accuracy equals its confidence in each bin; ECE weighs the gaps by bin size.",
          ""]
    for name, lines in zip(names, lines_by_run, strict=True):
        bins, ece = reliability_bins(lines)
        if ece is None:
            md += [f"**{name}**: no confidences (not a model of this pipeline).", ""]
            continue
        rows = [[f"{b['lo']:.1f}–{b['hi']:.1f}", str(b["n"]), _fmt(b["confidence"], ".3f"), _fmt(b["accuracy"], ".3f")]
                for b in bins if b["n"]]
        md += [f"**{name}** (ECE {ece:.4f}):", ""] + _table(["confidence bin", "lines", "mean confidence",
                                                              "line accuracy"], rows) + [""]
    return md


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _aligned_lines(runs) -> list[list[dict]]:
    """Per-line lists of every run ordered like the first run's, after checking they hold the same ids."""
    first_name, _, first_lines = runs[0]
    ids = [pl.get("id") for pl in first_lines]
    if None in ids:
        raise ValueError(
            f"run {first_name!r}: every per-line dict needs an 'id' (missing at index {ids.index(None)})"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"run {first_name!r}: line ids are not unique")
    out = [first_lines]
    for name, _, lines in runs[1:]:
        by_id = {pl.get("id"): pl for pl in lines}
        missing, extra = set(ids) - set(by_id), set(by_id) - set(ids)
        if missing or extra or len(by_id) != len(lines):
            raise ValueError(
                f"run {name!r} is not on the same lines as {first_name!r}: "
                f"{len(missing)} ids missing (e.g. {sorted(map(str, missing))[:3]}), "
                f"{len(extra)} extra (e.g. {sorted(map(str, extra))[:3]}), {len(lines) - len(by_id)} duplicated"
            )
        out.append([by_id[i] for i in ids])
    return out


def _changes_section(base_name, base_lines, name, lines, n_examples: int) -> list[str]:
    deltas = [(o["cer_norm"] - b["cer_norm"], b, o) for b, o in zip(base_lines, lines, strict=True)]
    worse = sorted((d for d in deltas if d[0] > 0), key=lambda d: (-d[0], str(d[1]["id"])))
    better = sorted((d for d in deltas if d[0] < 0), key=lambda d: (d[0], str(d[1]["id"])))
    same = len(deltas) - len(worse) - len(better)
    md = [
        f"### {name} vs {base_name}",
        "",
        f"Per-line normalised CER: **{len(better)} better**, **{len(worse)} worse**, {same} unchanged.",
        "",
    ]
    for title, sel in (
        ("Got worse (largest CER increase first)", worse),
        ("Got better (largest CER decrease first)", better),
    ):
        md += [f"{title}:", ""]
        if not sel:
            md += ["(none)", ""]
            continue
        header = ["id", "reference", base_name, name, "CER", "Δ"]
        rows = [
            [
                _cell(str(b["id"]), 24),
                _cell(b["reference"]),
                _cell(b["hypothesis"]),
                _cell(o["hypothesis"]),
                f"{b['cer_norm']:.3f} → {o['cer_norm']:.3f}",
                f"{d:+.3f}",
            ]
            for d, b, o in sel[:n_examples]
        ]
        md += _table(header, rows) + [""]
    return md


def write_comparison_report(
    runs: list[tuple[str, dict, list[dict]]],
    out_dir: str | os.PathLike,
    *,
    n_examples: int = 5,
    top_confusions: int = 10,
) -> Path:
    """Write ``report.md`` and its PNG plots comparing evaluated runs on the same lines.

    Args:
        runs: ``(display name, corpus, per_line)`` per run, as :func:`dsocr.metrics.score_lines` returns them;
            every per-line dict also carries ``id``. The first run is the baseline of the better/worse
            section. All runs must cover the same ids (order may differ).
        out_dir: Folder to write into (created if missing); existing report files are overwritten.
        n_examples: Examples shown per better/worse list.
        top_confusions: Confusion pairs shown per run (table and plot).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: If there is no run, names repeat, or the runs are not on the same line ids.
    """
    if not runs:
        raise ValueError("write_comparison_report needs at least one run")
    names = [name for name, _, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    corpora = [c for _, c, _ in runs]
    lines_by_run = _aligned_lines(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- plots first, so the markdown can link them ----
    with matplotlib.rc_context(_rc()):
        plots = {
            "Per-line CER": _plot_cer_hist(names, lines_by_run, out / "cer_hist.png"),
            "CER by reference length": _plot_cer_by_length(names, lines_by_run, out / "cer_by_length.png"),
            "Error kinds": _plot_error_kinds(names, corpora, out / "error_kinds.png"),
            "Confusion pairs": _plot_confusions(names, corpora, out / "confusion_pairs.png", top_confusions),
        }
        with_confidence = any(pl.get("confidence_mean") is not None for lines in lines_by_run for pl in lines)
        if with_confidence:
            plots["Reliability"] = _plot_reliability(names, lines_by_run, out / "reliability.png")
        tag_keys = _tag_keys(corpora)
        if tag_keys:
            plots["CER by tag"] = _plot_cer_by_tag(names, corpora, tag_keys, out / "cer_by_tag.png")

    md = ["# OCR comparison report", ""]
    md += [f"Runs: {', '.join(f'**{n}**' for n in names)}; {len(lines_by_run[0])} lines each.", ""]
    norms = {c.get("normalization", "?") for c in corpora}
    md += [f"Normalisation (the *norm* metrics): {' / '.join(sorted(norms))}."]
    if len(norms) > 1:
        md += [
            "",
            "**Warning: the runs use different normalisations; their norm metrics are not comparable.**",
        ]
    md += [""]

    md += ["## Corpus metrics", ""]
    rows = [[label] + [_fmt(c.get(key), spec) for c in corpora] for key, label, spec in METRIC_ROWS]
    md += _table(["metric"] + names, rows) + [""]

    md += ["## Error kinds", "", "Lines of each kind (share of lines); a line may have several kinds.", ""]
    rows = [
        [kind]
        + [
            f"{c.get('error_kinds', {}).get(kind, 0)} ({c.get('error_kind_rates', {}).get(kind, 0.0):.1%})"
            for c in corpora
        ]
        for kind in ERROR_KINDS
    ]
    md += _table(["kind"] + names, rows) + [""]

    md += [
        "## Top confusion pairs",
        "",
        "Reference → hypothesis character, from normalised substitutions.",
        "",
    ]
    for name, c in zip(names, corpora, strict=True):
        pairs = c.get("confusion_pairs", [])[:top_confusions]
        md += [
            f"**{name}**: " + (", ".join(f"{p['ref']}→{p['hyp']} ×{p['count']}" for p in pairs) or "(none)"),
            "",
        ]

    if len(runs) > 1:
        md += ["## What got better and what got worse", ""]
        for name, lines in zip(names[1:], lines_by_run[1:], strict=True):
            md += _changes_section(names[0], lines_by_run[0], name, lines, n_examples)

    if tag_keys:
        md += _tag_section(names, corpora, tag_keys)

    if with_confidence:
        md += _reliability_section(names, lines_by_run)

    md += ["## Plots", ""]
    for title, path in plots.items():
        md += [f"### {title}", "", f"![{title}]({path.name})", ""]

    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return report
