"""``deepseek_ocr_v1``: the pipeline's adapter for native DeepSeek-OCR v1 (see ``dsocr.models.base``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dsocr.models.base import ImageInputs, ModelFamily, scale_tiny_output_head

from .configuration import DeepseekOCRConfig
from .modeling import DeepseekOCRForCausalLM

_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def tiny_config() -> DeepseekOCRConfig:
    """A tiny random v1 that the REAL preprocessing and tokenizer drive (tests, CPU demo).

    Real vocabulary (129,280 rows) and real image geometry (SAM patch 16, 1024-px position table, window 14,
    two stride-2 convs, CLIP 224/14 position table), so every mode gives the official token counts
    (tiny 73, gundam 273 + tiles); only widths and depths shrink.
    """
    return DeepseekOCRConfig(
        # 256, not 64: with 129,280 random output rows a 64-d hidden state can only point at one token
        # at a time (random rows crowd it), so a LoRA-only fine-tune learns very slowly; 256 learns the
        # demo's lines within minutes. The two 33 M-row embeddings dominate the size; compute stays tiny
        # because the loss projects only supervised positions onto the vocabulary.
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,  # layer 0 dense, layer 1 MoE
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=8192,
        pad_token_id=2,
        sam_width=32,
        sam_depth=2,
        sam_heads=2,
        sam_global_attn_indexes=[1],
        sam_out_chans=16,
        sam_downsample_channels=[32, 64],
        clip_width=64,
        clip_layers=2,
        clip_heads=4,
        clip_mlp_dim=128,
        projector_input_dim=128,
        dtype="float32",
    )


class DeepseekOCRv1Family(ModelFamily):
    """DeepSeek-OCR v1 (``deepseek-ai/DeepSeek-OCR``) through our native ``DeepseekOCRForCausalLM``."""

    name = "deepseek_ocr_v1"
    image_modes = ("tiny", "small", "base", "large", "gundam")
    default_image_mode = "gundam"
    # SAM, CLIP and the projector (image_newline / view_seperator are bare Parameters: they stay frozen
    # under PEFT; the model's own set_vision_trainable covers them outside PEFT).
    vision_module_names = ("sam_model", "vision_model", "projector")

    def load_tokenizer(self, name_or_path: str, revision: str | None = None):
        """Load the checkpoint's tokenizer (``dsocr.models.tokenizer.load_tokenizer``)."""
        from dsocr.models.tokenizer import load_tokenizer

        return load_tokenizer(name_or_path, revision=revision)

    def load_model(
        self,
        name_or_path: str,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> DeepseekOCRForCausalLM:
        """Load with ``from_pretrained``; any missing or unexpected checkpoint key is an error."""
        kwargs: dict[str, Any] = {"revision": revision}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return DeepseekOCRForCausalLM.from_pretrained(name_or_path, **kwargs)

    def image_processor(self, model, image_mode: str, revision: str | None = None):
        """``DeepseekOCRImageProcessor`` for ``image_mode`` with patch size and downsampling from the config.

        ``revision`` is unused: v1 ships no preprocessor file, every size comes from ``model.config``.
        """
        from .processing import DeepseekOCRImageProcessor

        if image_mode not in self.image_modes:
            raise ValueError(f"image mode {image_mode!r} is not one of {', '.join(self.image_modes)}")
        config = model.config
        # Each stride-2 compressor conv halves the SAM grid: 2 convs -> 4.
        downsample = 2 ** len(config.sam_downsample_channels)
        return DeepseekOCRImageProcessor(image_mode, patch_size=config.sam_patch_size, downsample_ratio=downsample)

    def collate_images(self, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Concatenate per-image tensors in image order.

        Returns:
            ``pixel_values`` ``[N, 3, S, S]``, ``images_spatial_crop`` ``[N, 2]`` and, only when some image
            of the batch has tiles, ``pixel_values_local`` ``[T, 3, 640, 640]``. Empty dict for no images.
        """
        if not images:
            return {}
        out = {
            "pixel_values": torch.cat([im.tensors["pixel_values"] for im in images], dim=0),
            "images_spatial_crop": torch.cat([im.tensors["images_spatial_crop"] for im in images], dim=0),
        }
        tiles = [im.tensors["pixel_values_local"] for im in images if "pixel_values_local" in im.tensors]
        tiles = [t for t in tiles if t.shape[0] > 0]
        if tiles:
            out["pixel_values_local"] = torch.cat(tiles, dim=0)
        return out

    def image_token_id(self, model) -> int:
        """``config.image_token_id`` (128815 for the official tokenizer)."""
        return int(model.config.image_token_id)

    def pool_adapters(self, model) -> int:
        """Pool each MoE layer's expert LoRA into one Parameter per projection (``DeepseekOCRMoE.pool_lora``)."""
        return sum(m.pool_lora() for m in model.modules() if hasattr(m, "pool_lora"))

    def lora_targets(self, model, module_names: list[str]) -> dict[str, Any]:
        """PEFT kwargs: a ``target_modules`` regex restricted to the language model's Linears.

        Attention names match ``model.layers.N.self_attn.*``; MLP names match the dense MLP of the first
        layers, every routed expert (``mlp.experts.E.*``) and the shared experts. SAM, CLIP, the projector
        and the router (a bare Parameter) never match.

        Args:
            model: The model (unused: the layout is fixed).
            module_names: Subset of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.

        Returns:
            ``{"target_modules": <regex str>}`` for ``peft.LoraConfig``.
        """
        unknown = sorted(set(module_names) - set(_ATTENTION_NAMES + _MLP_NAMES))
        if unknown or not module_names:
            raise ValueError(
                f"lora target modules {unknown or module_names} not supported for {self.name}; valid: "
                f"{', '.join(_ATTENTION_NAMES + _MLP_NAMES)}"
            )
        attn = [n for n in _ATTENTION_NAMES if n in module_names]
        mlp = [n for n in _MLP_NAMES if n in module_names]
        branches = []
        if attn:
            branches.append(rf"self_attn\.({'|'.join(attn)})")
        if mlp:
            branches.append(rf"mlp\.((experts\.\d+|shared_experts)\.)?({'|'.join(mlp)})")
        # PEFT fullmatches a string target against each module name of the base model.
        pattern = rf"model\.layers\.\d+\.({'|'.join(branches)})"
        re.compile(pattern)
        return {"target_modules": pattern}

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """Write a tiny random v1 (``tiny_config``) plus the offline tokenizer to ``out_dir``."""
        from dsocr.models.tokenizer import build_offline_tokenizer

        out_dir = Path(out_dir)
        torch.manual_seed(seed)
        model = DeepseekOCRForCausalLM(tiny_config())
        scale_tiny_output_head(model, seed=seed)
        model.save_pretrained(out_dir)
        build_offline_tokenizer().save_pretrained(out_dir)


__all__ = ["DeepseekOCRv1Family", "tiny_config"]
