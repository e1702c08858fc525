"""Shared evaluation machinery: exact corpus NLL and fast batched greedy generation.

Used by ``eval_ppl.py``, ``eval_cer.py`` and the evaluation inside training (``dsocr.trainer``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from collator.deepseek_ocr import IGNORE_INDEX, DeepSeekOCRDataCollator
from dsocr.devices import batch_to, model_dtype


@torch.no_grad()
def corpus_nll(model, collator: DeepSeekOCRDataCollator, records: Sequence, batch_size: int,
               device: torch.device, progress: bool = False) -> tuple[float, int]:
    """Total negative log-likelihood (nats) over every target token, and the number of target tokens.

    Perplexity = exp(total / tokens). Each batch's loss is computed as a *sum* (``num_items_in_batch`` =
    the batch's target count turns HF's mean into sum / count, which we multiply back), so the result
    does not depend on batch size or padding — averaging per-batch means would.
    """
    sums = batch_nll_sums(model, collator, records, batch_size, device, progress=progress)
    return sum_batches(sums)


@torch.no_grad()
def batch_nll_sums(model, collator: DeepSeekOCRDataCollator, records: Sequence, batch_size: int,
                   device: torch.device, shard: tuple[int, int] = (0, 1),
                   progress: bool = False) -> dict[int, tuple[float, int]]:
    """``{batch number: (NLL sum, target tokens)}`` for the batches of ``records`` that this shard owns.

    Batches are the consecutive ``batch_size`` slices of ``records``, so they are the same whatever the
    shard; shard ``(rank, world)`` computes batches ``rank, rank + world, ...``. Merging every shard's
    dict and summing in batch order (``sum_batches``) gives the single-process total bit for bit.
    """
    rank, world = shard
    was_training = model.training
    model.eval()
    dtype = model_dtype(model)  # no autocast here: pixels must match the weights (bf16 on the GPU)
    numbers = list(range(0, (len(records) + batch_size - 1) // batch_size))[rank::world]
    sums, counts = [], []
    for b in tqdm(numbers, desc="nll", disable=not progress):
        start = b * batch_size
        batch = collator(list(records[start:start + batch_size]))
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch = batch_to(batch, device, dtype)
        out = model(**batch, use_cache=False, num_items_in_batch=torch.tensor(n, device=device))
        sums.append(out.loss.detach().float() * n)  # kept on device: one sync at the end
        counts.append(n)
    model.train(was_training)
    values = torch.stack(sums).tolist() if sums else []
    return {b: (v, n) for b, v, n in zip(numbers, values, counts)}


def sum_batches(sums: dict[int, tuple[float, int]]) -> tuple[float, int]:
    """``(total NLL, target tokens)`` of ``batch_nll_sums`` results, summed in batch order (float64)."""
    total = float(torch.tensor([sums[b][0] for b in sorted(sums)], dtype=torch.float64).sum()) if sums else 0.0
    return total, sum(n for _, n in sums.values())


@dataclass
class GenerationSettings:
    """Greedy decoding settings shared by every evaluation."""

    batch_size: int = 16
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 20  # the official guard against repetition loops; 0 = off
    # Processes preparing the next batches (image preprocessing) while the model generates; None = auto:
    # 0 on the CPU (the model needs the cores), else up to 8.
    num_workers: int | None = None


def loader_workers(configured: int | None, device: torch.device) -> int:
    """Preprocessing workers for generation: ``configured``, or 0 on the CPU and min(8, CPUs) elsewhere."""
    if configured is not None:
        return int(configured)
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


class _GenerationBatches(torch.utils.data.Dataset):
    """Batch ``k`` of a fixed list of index lists, collated for ``generate()`` (run in DataLoader workers)."""

    def __init__(self, collator: DeepSeekOCRDataCollator, records: Sequence, batches: list[list[int]]):
        self.collator, self.records, self.batches = collator, records, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        idx = self.batches[k]
        batch, ids, refs = self.collator.generation_batch([self.records[i] for i in idx])
        return idx, batch, ids, refs


def max_new_tokens_for(tokenizer, references: Sequence[str], configured: int | None) -> int:
    """``configured`` if set, else twice the longest reference in tokens plus EOS slack.

    Sized from the data so a short-line benchmark does not pay for 8,192 steps, while still leaving
    room to *see* over-generation and loops (they are error kinds we report, not hide).
    """
    if configured is not None:
        return int(configured)
    longest = max((len(tokenizer.encode(r, add_special_tokens=False)) for r in references), default=0)
    return 2 * longest + 8


def decode_continuations(tokenizer, sequences: torch.Tensor, prompt_width: int) -> list[str]:
    """Text after the prompt, cut at the first EOS, pad removed, stripped (as the official ``infer``).

    Special tokens other than EOS/PAD are kept so that a prompt echo (``<image>``, ``<|grounding|>``)
    shows up in the predictions and the error-kind metrics instead of vanishing.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = []
    for row in sequences[:, prompt_width:].tolist():
        if eos in row:
            row = row[: row.index(eos)]
        row = [t for t in row if t != pad]
        texts.append(tokenizer.decode(row, skip_special_tokens=False).strip())
    return texts


@torch.no_grad()
def generate_batched(model, collator: DeepSeekOCRDataCollator, records: Sequence, settings: GenerationSettings,
                     device: torch.device, progress: bool = True, shard: tuple[int, int] = (0, 1),
                     timings: dict[str, float] | None = None) -> list[dict]:
    """Greedy transcription of ``records`` in left-padded batches with a KV cache.

    Records are sorted by prompt length (image-slot count varies with the image) so batches carry little
    padding; results come back in input order. Deterministic: greedy, no sampling.

    Returns:
        One dict per record: ``id``, ``reference``, ``hypothesis``, ``new_tokens``, and the confidence of the
        greedy answer: ``confidence_mean`` / ``confidence_min``, the mean and minimum probability of the
        chosen tokens, EOS included (the stop decision is part of the answer), pads after it excluded;
        ``None`` when nothing was generated. See ``GreedyTokenLogProbs``. With ``shard=(rank, world)`` only
        the batches ``rank, rank + world, ...`` (of the length-sorted order, so the batches are those of
        one process) are generated; the other records' entries are ``None``. ``timings``, if given, receives
        host-clock seconds: ``wait_s`` (waiting for preprocessed batches), ``generate_s`` (copy to the device
        and ``generate``, synchronised by its results), ``post_s`` (decoding the answers).
    """
    # Skipped (bad) records were already counted and logged by the dataset; score the rest.
    records = [r for r in records if r is not None]
    was_training = model.training
    model.eval()
    dtype = model_dtype(model)
    tokenizer = collator.tokenizer
    gen_collator = DeepSeekOCRDataCollator(
        tokenizer=tokenizer, family=collator.family, image_processor=collator.image_processor,
        image_token_id=collator.image_token_id, train=False, max_length=collator.max_length,
    )
    # Encode once to know each prompt's length; pixels are recomputed per batch (cheap next to the model).
    order = sorted(range(len(records)), key=lambda i: _prompt_len(gen_collator, records[i]))
    results: list[dict | None] = [None] * len(records)
    starts = list(range(0, len(order), settings.batch_size))[shard[0]::shard[1]]
    batches = [order[start:start + settings.batch_size] for start in starts]
    # Preprocessing a Gundam batch (resizes, tiles) takes seconds on one core: workers prepare the next
    # batches while the model generates, in the same order, so the results are those of a serial loop.
    workers = loader_workers(settings.num_workers, device)
    loader = torch.utils.data.DataLoader(
        _GenerationBatches(gen_collator, records, batches), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=2 if workers else None, pin_memory=device.type == "cuda",
    )
    clock = {"wait_s": 0.0, "generate_s": 0.0, "post_s": 0.0}
    mark = time.perf_counter()
    for idx, batch, ids, refs in tqdm(loader, total=len(batches), desc="generate", disable=not progress):
        now = time.perf_counter()
        clock["wait_s"] += now - mark
        width = batch["input_ids"].shape[1]
        batch = batch_to(batch, device, dtype)
        recorder = GreedyTokenLogProbs()
        out = model.generate(
            **batch, do_sample=False, num_beams=1, max_new_tokens=settings.max_new_tokens,
            no_repeat_ngram_size=settings.no_repeat_ngram_size or None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
            logits_processor=LogitsProcessorList([recorder]),
        )
        out = out.cpu()  # waits for the device: the generate time ends here
        mark = time.perf_counter()
        clock["generate_s"] += mark - now
        hyps = decode_continuations(tokenizer, out, width)
        new_tokens = (out[:, width:] != tokenizer.pad_token_id).sum(1).tolist()
        confidences = recorder.confidences(out[:, width:], tokenizer.eos_token_id)
        for i, rid, ref, hyp, n, (c_mean, c_min) in zip(idx, ids, refs, hyps, new_tokens, confidences):
            results[i] = {"id": rid, "reference": ref, "hypothesis": hyp, "new_tokens": int(n),
                          "confidence_mean": c_mean, "confidence_min": c_min}
        now = time.perf_counter()
        clock["post_s"] += now - mark
        mark = now
    if timings is not None:
        timings.update({k: round(v, 3) for k, v in clock.items()})
    model.train(was_training)
    return results  # type: ignore[return-value]


class GreedyTokenLogProbs(LogitsProcessor):
    """Records, at every step of greedy ``generate``, the log-probability of the token greedy decoding picks.

    ``generate`` appends custom processors after its own (the no-repeat-n-gram ban included) and applies
    no warper when it does not sample, so this one sees exactly the scores that ``output_scores`` returns
    and that the greedy argmax is taken over: the maximum of their log-softmax is the chosen token's
    log-probability (the same number as ``compute_transition_scores(..., normalize_logits=True)``). One
    ``[B]`` value per step is kept instead of ``output_scores``' ``[B, vocab]`` tensors, which for a page
    (thousands of steps over a 129,280-word vocabulary) would not fit in memory.
    """

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Record the chosen token's log-probability; the scores pass through unchanged."""
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)
        return scores

    def confidences(self, generated: torch.Tensor, eos_id: int) -> list[tuple[float | None, float | None]]:
        """``(mean, min)`` token probability per row of ``generated`` (the new tokens, ``[B, T]``).

        Positions up to and including a row's first EOS count; the padding a finished row receives while
        the others go on does not.
        """
        if not self.steps or generated.shape[1] == 0:
            return [(None, None)] * generated.shape[0]
        probs = torch.stack(self.steps, dim=1).exp().to(generated.device)  # [B, T]
        if probs.shape != generated.shape:
            raise RuntimeError(f"recorded {tuple(probs.shape)} step probabilities for {tuple(generated.shape)} "
                               "generated tokens: a generate() change broke the one-call-per-step contract")
        is_eos = (generated == eos_id).int()
        counted = (is_eos.cumsum(1) - is_eos) == 0  # nothing before this position was an EOS
        n = counted.sum(1).clamp(min=1)
        means = ((probs * counted).sum(1) / n).tolist()
        mins = probs.masked_fill(~counted, float("inf")).min(1).values.tolist()
        return list(zip(means, mins))


def _prompt_len(collator: DeepSeekOCRDataCollator, record) -> int:
    if record is None:
        return 0
    images = record["messages"][0].get("images") or []
    if not images:
        return 0
    proc = collator.image_processor
    if hasattr(proc, "num_image_tokens"):  # v1 knows the count from the size alone
        return proc.num_image_tokens(*images[0].size)
    return images[0].size[0] * 10_000 + images[0].size[1]  # a stable proxy: similar sizes together
