"""Confidence of a greedy answer: generate_batched's token probabilities, and the report's reliability plot."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dsocr.metrics import NormalizeConfig, score_lines
from dsocr.report import reliability_bins, write_comparison_report


@pytest.fixture(scope="module")
def tiny_v1(demo_data, tiny_model_dirs):
    from conftest import TINY_CONFIG

    from dsocr.config import load_config
    from dsocr.datasets import load_eval_records
    from dsocr.loading import load_for_eval

    cfg = load_config(TINY_CONFIG["deepseek_ocr_v1"], [f"model.name_or_path={tiny_model_dirs('deepseek_ocr_v1')}",
                                       f"data.dataset={demo_data}", "output_dir=unused", "eval.max_samples=5"])
    loaded = load_for_eval(str(tiny_model_dirs("deepseek_ocr_v1")), cfg=cfg, device=torch.device("cpu"))
    return loaded, loaded.make_collator(train=False), load_eval_records(cfg)


def test_confidence_is_the_probability_output_scores_give_the_chosen_tokens(tiny_v1):
    from transformers import LogitsProcessorList

    from dsocr.generation import GreedyTokenLogProbs

    loaded, collator, records = tiny_v1
    batch, _, _ = collator.generation_batch(records[:3])
    width = batch["input_ids"].shape[1]
    recorder = GreedyTokenLogProbs()
    with torch.no_grad():
        out = loaded.model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=6, no_repeat_ngram_size=2,
                                    eos_token_id=1, pad_token_id=2, output_scores=True, return_dict_in_generate=True,
                                    logits_processor=LogitsProcessorList([recorder]))
    generated = out.sequences[:, width:]
    # The chosen tokens' probabilities under the returned scores, in float64: what output_scores says.
    reference = torch.stack([torch.log_softmax(s.double(), -1).gather(1, generated[:, t:t + 1])[:, 0]
                             for t, s in enumerate(out.scores)], dim=1).exp()
    ours = torch.stack(recorder.steps, dim=1).exp()
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=2e-5)  # float32 vs float64
    # transformers' own helper agrees up to its float32 log-softmax over a strided layout (~1e-4).
    helper = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).exp()
    torch.testing.assert_close(ours, helper, rtol=0, atol=5e-4)
    for row, (mean, low) in enumerate(recorder.confidences(generated, eos_id=1)):
        ids = generated[row].tolist()
        n = ids.index(1) + 1 if 1 in ids else len(ids)  # up to and including EOS
        assert math.isclose(mean, float(reference[row, :n].mean()), abs_tol=2e-5)
        assert math.isclose(low, float(reference[row, :n].min()), abs_tol=2e-5)


def test_batched_confidences_equal_one_at_a_time(tiny_v1):
    from dsocr.generation import GenerationSettings, generate_batched

    loaded, collator, records = tiny_v1
    batched = generate_batched(loaded.model, collator, records, GenerationSettings(batch_size=5, max_new_tokens=8),
                               torch.device("cpu"), progress=False)
    single = generate_batched(loaded.model, collator, records, GenerationSettings(batch_size=1, max_new_tokens=8),
                              torch.device("cpu"), progress=False)
    assert [p["hypothesis"] for p in batched] == [p["hypothesis"] for p in single]
    for a, b in zip(batched, single):
        assert 0 < a["confidence_min"] <= a["confidence_mean"] <= 1
        assert abs(a["confidence_mean"] - b["confidence_mean"]) < 1e-4 and abs(a["confidence_min"] - b["confidence_min"]) < 1e-4


def test_preprocessing_workers_give_the_serial_results_in_input_order(tiny_v1, monkeypatch):
    import dsocr.generation as generation

    loaded, collator, records = tiny_v1
    seen = []
    real = torch.utils.data.DataLoader
    monkeypatch.setattr(generation.torch.utils.data, "DataLoader",
                        lambda *a, **k: seen.append(k["num_workers"]) or real(*a, **k))
    settings = {w: generation.GenerationSettings(batch_size=2, max_new_tokens=6, num_workers=w) for w in (0, 2)}
    serial, parallel = (generation.generate_batched(loaded.model, collator, records, settings[w], torch.device("cpu"),
                                                    progress=False) for w in (0, 2))
    assert seen == [0, 2]
    assert parallel == serial  # ids, hypotheses and confidences, record by record
    assert [p["id"] for p in parallel] == [r["id"] for r in records]
    assert generation.loader_workers(None, torch.device("cpu")) == 0


def test_eos_ends_what_counts():
    from dsocr.generation import GreedyTokenLogProbs

    rec = GreedyTokenLogProbs()
    rec.steps = [torch.log(torch.tensor([0.5, 0.9])), torch.log(torch.tensor([0.25, 0.8])),
                 torch.log(torch.tensor([0.01, 0.7]))]
    generated = torch.tensor([[7, 1, 2], [7, 8, 9]])  # row 0 stops at step 2 (EOS = 1), then a pad
    (m0, lo0), (m1, lo1) = rec.confidences(generated, eos_id=1)
    assert math.isclose(m0, 0.375, abs_tol=1e-6) and math.isclose(lo0, 0.25, abs_tol=1e-6)  # not the pad's 0.01
    assert math.isclose(m1, 0.8, abs_tol=1e-6) and math.isclose(lo1, 0.7, abs_tol=1e-6)


def _lines(refs, hyps, confidences):
    corpus, lines = score_lines(refs, hyps, normalize_cfg=NormalizeConfig())
    for i, (pl, c) in enumerate(zip(lines, confidences)):
        pl["id"], pl["confidence_mean"] = f"l{i}", c
    return corpus, lines


def test_reliability_bins_and_ece():
    _, lines = _lines(["a", "b", "c", "d"], ["a", "x", "c", "d"], [0.95, 0.92, 0.15, 1.0])
    bins, ece = reliability_bins(lines)
    full = {round(b["lo"], 1): (b["n"], b["accuracy"]) for b in bins if b["n"]}
    assert full == {0.1: (1, 1.0), 0.9: (3, 2 / 3)}  # 1.0 lands in the last bin
    assert math.isclose(ece, 0.25 * abs(1.0 - 0.15) + 0.75 * abs(2 / 3 - (0.95 + 0.92 + 1.0) / 3))


def test_report_draws_the_reliability_plot_and_table(tmp_path):
    refs = ["发票金额", "物流很快", "他很瘦", "你好"]
    base = ("base", *_lines(refs, ["发要金额", "物流快", "他很瘦", "好"], [0.4, 0.35, 0.9, 0.2]))
    tuned = ("tuned", *_lines(refs, refs, [0.97, 0.91, 0.99, 0.88]))
    corpus, lines = score_lines(refs, refs, normalize_cfg=NormalizeConfig())  # a peer: no confidence
    for i, pl in enumerate(lines):
        pl["id"] = f"l{i}"
    report = write_comparison_report([base, tuned, ("peer", corpus, lines)], tmp_path)
    md = report.read_text(encoding="utf-8")
    assert "## Reliability (confidence vs line accuracy)" in md and "![Reliability](reliability.png)" in md
    assert "**tuned** (ECE" in md and "**peer**: no confidences" in md
    with Image.open(tmp_path / "reliability.png") as im:
        im.verify()
