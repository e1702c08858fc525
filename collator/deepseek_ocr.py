"""``DeepSeekOCRDataCollator``: conversation records to model inputs, exactly as the official prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: the collator sits below the core and imports nothing of it
    from dsocr.models.base import ImageProcessor, ModelFamily

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # CrossEntropyLoss(ignore_index) default; HF's ForCausalLMLoss uses the same


@dataclass
class DeepSeekOCRDataCollator:
    r"""Builds DeepSeek-OCR training or generation batches from conversation records.

    **Input**: a list of records as produced by ``data.convert.to_conversation``::

        {"id": "train-17",
         "messages": [{"role": "<|User|>", "content": "<image>\\nFree OCR.", "images": [PIL.Image]},
                      {"role": "<|Assistant|>", "content": "海信LED46EC3"}]}

    The user message may hold no image (a text-only row: no image slots); it must then not contain
    ``<image>``. ``None`` entries (records a ``ConversationDataset`` skipped with ``on_bad_record: skip``;
    it has already logged them) are dropped and counted in ``self.num_skipped``; a batch with no record
    left raises. Any other unexpected input raises ``KeyError``/``ValueError`` naming the record and key.

    **Sequence** (the official ``plain`` template of ``infer()``, docs/MODEL_NOTES.md §2)::

        [BOS] + ids(text before <image>) + [image_token_id] * n + ids(text after <image>)   # prompt
              + ids(answer.strip()) + [EOS]                                                  # target

    Each piece is tokenised separately without special tokens (for "<image>\\nFree OCR." the prompt
    after the slots is ids("\\nFree OCR.")). ``n`` comes from the family's image processor and must equal
    the visual feature rows the model produces; the model checks that, and this collator checks that no
    text piece itself tokenises to the image id (a literal "<image>" in a label would shift every slot).

    **Output** (``train=True``; right-padded with the tokenizer's pad id):
        * ``input_ids``: long ``[B, L]``.
        * ``attention_mask``: long ``[B, L]``, 1 on real tokens, 0 on padding.
        * ``labels``: long ``[B, L]``, **unshifted** (the model shifts): the answer ids and EOS;
          ``-100`` on BOS, image slots, prompt text and padding, so only the transcription is learnt.
        * the family's image tensors (``ModelFamily.collate_images``), e.g. for v1 ``pixel_values``
          float32 ``[N, 3, S, S]``, ``pixel_values_local`` float32 ``[T, 3, 640, 640]``,
          ``images_spatial_crop`` long ``[N, 2]``; N = rows with an image, in row order.

    With ``train=False`` the batch is the prompt alone, **left**-padded for batched generation (the
    last position of every row is the last prompt token), without ``labels``; ``generation_batch``
    also returns the record ids and reference texts.

    Attributes:
        tokenizer: The checkpoint's tokenizer (BOS/EOS/PAD ids are read from it).
        family: The model family (collates the image tensors).
        image_processor: The family's processor for the run's image mode.
        image_token_id: Id of the image slot token, from the model config.
        train: True for training batches (prompt + answer + EOS, labels), False for generation.
        max_length: If set, a longer sequence raises (never truncated silently: it would cut labels).
        supervised_logits_only: Also emit ``logits_to_keep`` (long ``[K]``: the positions whose logits
            predict a label in some row) and ``shift_labels`` (long ``[B, K]``: the labels they predict),
            so the model projects only those K rows onto the 129,280-word vocabulary instead of all L
            (the full fp32 logits cost ~0.5 GB per 1,000 tokens). The loss is identical; the model must
            accept both (transformers' ``logits_to_keep`` + ``ForCausalLMLoss(shift_labels=)``).
    """

    tokenizer: Any
    family: ModelFamily
    image_processor: ImageProcessor
    image_token_id: int
    train: bool = True
    max_length: int | None = None
    supervised_logits_only: bool = False
    num_skipped: int = field(default=0, init=False)

    def __post_init__(self):
        tok = self.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError(
                f"tokenizer lacks BOS/EOS/PAD ids ({self.bos_id}, {self.eos_id}, {self.pad_id}); "
                "load it with dsocr.models.tokenizer.load_tokenizer"
            )
        self._piece_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ one record
    def _encode(self, text: str, record_id: str, what: str) -> list[int]:
        if text not in self._piece_cache:
            ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
            if self.image_token_id in ids:
                raise ValueError(
                    f"record {record_id!r}: the {what} {text!r} contains the image token "
                    f"(id {self.image_token_id}); only one '<image>' placeholder in the instruction is allowed. "
                    "To fix: remove '<image>' from the label/instruction text."
                )
            if len(self._piece_cache) < 4096:  # prompts repeat; labels rarely do
                self._piece_cache[text] = ids
            return ids
        return self._piece_cache[text]

    def encode_record(self, record: dict) -> dict[str, Any]:
        """One record to ``prompt_ids``, ``answer_ids`` (with EOS), ``image`` (``ImageInputs`` or None)."""
        if not isinstance(record, dict) or "messages" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise KeyError(f"collator expects records with 'messages' (data.convert.to_conversation); got {keys}")
        record_id = str(record.get("id", "?"))
        messages = record["messages"]
        if len(messages) != 2 or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise ValueError(
                f"record {record_id!r}: expected [user, assistant] messages with 'content', got {messages!r:.200}"
            )
        user, assistant = messages
        images = user.get("images") or []
        prompt = str(user["content"]).strip()  # the official plain template strips each message
        if len(images) > 1:
            raise ValueError(f"record {record_id!r} has {len(images)} images; DeepSeek-OCR takes one per sample")
        if images and prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(
                f"record {record_id!r}: the instruction {prompt!r} must contain '<image>' exactly once "
                "when the record has an image"
            )
        if not images and IMAGE_PLACEHOLDER in prompt:
            raise ValueError(f"record {record_id!r}: instruction has '<image>' but the record has no image")

        image_inputs = self.image_processor(images[0]) if images else None
        before, _, after = prompt.partition(IMAGE_PLACEHOLDER) if images else (prompt, "", "")
        prompt_ids = [self.bos_id] + self._encode(before, record_id, "instruction")
        if image_inputs is not None:
            prompt_ids += [self.image_token_id] * image_inputs.num_image_tokens
            prompt_ids += self._encode(after, record_id, "instruction")
        answer = assistant["content"]
        if not isinstance(answer, str):
            raise ValueError(f"record {record_id!r}: the answer must be a string, got {type(answer).__name__}")
        answer_ids = self.tokenizer.encode(answer.strip(), add_special_tokens=False) + [self.eos_id]
        if self.image_token_id in answer_ids:
            raise ValueError(
                f"record {record_id!r}: the label {answer!r:.80} contains the image token; remove '<image>' from it"
            )
        return {"id": record_id, "prompt_ids": prompt_ids, "answer_ids": answer_ids, "image": image_inputs,
                "answer": answer.strip()}

    # ------------------------------------------------------------------ batches
    def _live(self, records: list) -> list[dict]:
        live = [r for r in records if r is not None]
        self.num_skipped += len(records) - len(live)
        if not live:
            raise ValueError(
                f"every record of this batch of {len(records)} was skipped as bad (see the skipped-records log); "
                "fix the data or run `python -m data.check` to list the bad records"
            )
        return live

    def __call__(self, records: list[dict | None]) -> dict[str, torch.Tensor]:
        """Collate a batch for training (``train=True``) or prompt-only for generation."""
        return self.generation_batch(records)[0] if not self.train else self._train_batch(self._live(records))

    def _check_length(self, length: int, record_id: str) -> None:
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"record {record_id!r} needs {length} tokens > max_length {self.max_length}; "
                "shorten the label, use a smaller image mode or raise the limit"
            )

    def _train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode_record(r) for r in records]
        lengths = [len(e["prompt_ids"]) + len(e["answer_ids"]) for e in encoded]
        for e, n in zip(encoded, lengths):
            self._check_length(n, e["id"])
        width = max(lengths)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (e, n) in enumerate(zip(encoded, lengths)):
            p = len(e["prompt_ids"])
            input_ids[row, :n] = torch.tensor(e["prompt_ids"] + e["answer_ids"])
            labels[row, p:n] = torch.tensor(e["answer_ids"])  # answer + EOS; prompt stays -100
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.supervised_logits_only:
            # Position p predicts token p+1: keep p from the earliest last-prompt token to the latest
            # last-answer token over the batch (a contiguous range: one slice, no gather per row).
            first = min(len(e["prompt_ids"]) for e in encoded) - 1
            keep = torch.arange(first, width - 1)
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = labels[:, keep + 1]
        batch.update(self.family.collate_images([e["image"] for e in encoded if e["image"] is not None]))
        return batch

    def generation_batch(self, records: list[dict | None]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        """Left-padded prompts for ``generate()``, plus the record ids and reference answers."""
        encoded = [self.encode_record(r) for r in self._live(records)]
        width = max(len(e["prompt_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["prompt_ids"])
            self._check_length(n, e["id"])
            input_ids[row, width - n:] = torch.tensor(e["prompt_ids"])
            attention_mask[row, width - n:] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(self.family.collate_images([e["image"] for e in encoded if e["image"] is not None]))
        return batch, [e["id"] for e in encoded], [e["answer"] for e in encoded]
