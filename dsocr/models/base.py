r"""The small interface every model family implements.

The pipeline (collator, training, both evaluations) never imports a model class directly: it asks the
family named in the config (``model.family``) for the tokenizer, the model, the image preprocessing and
the LoRA targets. Adding a model family means writing one ``ModelFamily`` subclass and registering it in
``dsocr/models/__init__.py``.

The token layout is shared by all DeepSeek-OCR families (docs/MODEL_NOTES.md §2, §5)::

    [BOS] + [image_token_id] * num_image_tokens + ids("\\n" + instruction) + ids(answer) + [EOS]

so a family only says how many image slots one image needs and which tensors carry its pixels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ImageInputs:
    """One image, preprocessed for one model family.

    Attributes:
        tensors: Family-specific float32 tensors for this single image (for example ``pixel_values``
            ``[1, 3, S, S]`` and ``pixel_values_local`` ``[P, 3, T, T]``). ``ModelFamily.collate_images``
            concatenates them over a batch.
        num_image_tokens: How many ``image_token_id`` slots this image occupies in the sequence. It must
            equal the number of visual feature rows the model produces for the image; the model checks it.
    """

    tensors: dict[str, torch.Tensor]
    num_image_tokens: int


class ImageProcessor(ABC):
    """Turns one RGB PIL image into ``ImageInputs`` for a fixed image mode."""

    @abstractmethod
    def __call__(self, image: Image.Image) -> ImageInputs:
        """Preprocess one RGB image (already EXIF-transposed and converted by ``data.images``)."""


class ModelFamily(ABC):
    """Everything model-specific the pipeline needs. One instance per family, stateless."""

    #: Registry name used in YAML ``model.family``.
    name: str
    #: Image modes this family accepts in ``collator.image_mode``.
    image_modes: tuple[str, ...]
    #: Mode used when the config says ``image_mode: default``.
    default_image_mode: str
    #: The model's forward accepts ``logits_to_keep`` (positions tensor) and ``shift_labels``.
    supports_logits_to_keep: bool = False
    #: Module names (PEFT ``modules_to_save`` patterns) of the vision towers + projector, trained in
    #: full and saved with the adapter when ``model.train_vision`` is true.
    vision_module_names: tuple[str, ...] = ()

    @abstractmethod
    def load_tokenizer(self, name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
        """Load the tokenizer saved with the model (hub id or local folder)."""

    @abstractmethod
    def load_model(
        self,
        name_or_path: str,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> PreTrainedModel:
        """Load the model with ``from_pretrained`` (hub id or local folder), on CPU, in ``dtype``."""

    @abstractmethod
    def image_processor(self, model: PreTrainedModel, image_mode: str, revision: str | None = None) -> ImageProcessor:
        """Build the preprocessing for ``image_mode``; sizes and token counts come from the checkpoint.

        ``revision`` is the hub revision the model was loaded at, for families that read a preprocessor
        file of the checkpoint.
        """

    @abstractmethod
    def collate_images(self, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Stack the per-image tensors of a batch (rows without an image contribute nothing)."""

    @abstractmethod
    def image_token_id(self, model: PreTrainedModel) -> int:
        """Id of the image slot token, read from the model config."""

    @abstractmethod
    def lora_targets(self, model: PreTrainedModel, module_names: list[str]) -> dict[str, Any]:
        """PEFT ``LoraConfig`` kwargs restricting ``module_names`` to the language model.

        ``module_names`` are e.g. ``["q_proj", ..., "down_proj"]``; the result holds ``target_modules``
        and optionally ``target_parameters``.
        """

    def pool_adapters(self, model: PreTrainedModel) -> int:
        """Re-lay a freshly wrapped LoRA model's adapter Parameters for training speed; returns how many.

        The adapter's saved names and values must not change (v1 pools its experts' LoRA, see
        ``deepseek_ocr_v1.grouped_experts.pool_expert_lora``). Default: nothing to do.
        """
        return 0

    @abstractmethod
    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """Write a tiny random-weight model of this family with the real offline tokenizer.

        ``load_model(out_dir)`` and ``load_tokenizer(out_dir)`` then load it like a hub checkpoint.
        """


def scale_tiny_output_head(model, row_norm: float = 4.0, seed: int = 0) -> None:
    """Give a tiny random model's ``lm_head`` the logit range of a trained one.

    With the default init (std 0.02) and a RMS-normalised hidden state of norm sqrt(H) = 8, no logit can
    exceed ~1.3, so no adapter can make one token beat 129,279 others: LoRA-only training of a tiny
    random model would plateau near log(vocab). Rows of norm ``row_norm`` allow margins of tens of
    nats, as in a real checkpoint, while everything else stays random.
    """
    import torch

    head = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=g) * (row_norm / head.shape[1] ** 0.5))
