"""DeepSeek-OCR-2 family: the native transformers implementation (``models/deepseek_ocr2``).

Checkpoint: ``deepseek-community/DeepSeek-OCR-2`` (or a local copy). Token layout per image
(docs/MODEL_NOTES.md §5): ``queries(global) + queries(tile) * n_tiles + 1`` slots (the last one is the view
separator), no newlines. The query count is fixed by the model (144 learnt queries when SAM yields at
most 144 patches, else 256), so it is derived here from the vision config rather than asked of
``DeepseekOcr2Processor``, whose hard-coded counts cannot drive a tiny test model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .base import ImageInputs, ImageProcessor, ModelFamily, scale_tiny_output_head
from .tokenizer import build_offline_tokenizer, load_tokenizer

# Image modes: (crop_to_patches, global side). "gundam" is the official OCR-2 setting (global view at
# the processor's size, 1024, plus up to max_patches tiles of tile_size when a side exceeds tile_size);
# "base" is the global view alone at size (257 tokens); "small" the global view alone at tile_size (145).
OCR2_MODES = ("gundam", "base", "small")


class DeepseekOCR2ImageProcessor(ImageProcessor):
    """Wraps transformers' ``DeepseekOcr2ImageProcessorPil`` and adds the slot count per image."""

    def __init__(self, hf_processor, vision_config, mode: str):
        if mode not in OCR2_MODES:
            raise ValueError(f"collator.image_mode {mode!r} is not one of {', '.join(OCR2_MODES)} for deepseek_ocr2")
        self.hf = hf_processor
        self.mode = mode
        sam = vision_config.sam_config
        # SAM patchifies, then each downsample conv halves the grid (stride 2).
        self._shrink = sam.patch_size * 2 ** len(sam.downsample_channels or [])
        global_side = hf_processor.size["height"] if mode == "gundam" else (
            hf_processor.size["height"] if mode == "base" else hf_processor.tile_size
        )
        self.kwargs: dict[str, Any] = {"crop_to_patches": mode == "gundam"}
        if mode == "base":
            # Without cropping the processor renders the global view at tile_size; ask for size instead.
            self.kwargs["tile_size"] = hf_processor.size["height"]
        self.global_tokens = self._queries(global_side)
        self.tile_tokens = self._queries(hf_processor.tile_size)

    def _queries(self, side: int) -> int:  # noqa: D102 - private helper
        # The model picks its 144-query table when SAM gives <= 144 patches, else the 256 one.
        patches = (side // self._shrink) ** 2
        return 144 if patches <= 144 else 256

    def __call__(self, image: Image.Image) -> ImageInputs:
        """Pixels from the HF image processor; slot count from the query tables."""
        out = self.hf(images=[image], return_tensors="pt", **self.kwargs)
        n_local = int(out["num_local_patches"][0]) if "num_local_patches" in out else 0
        tensors = {
            "pixel_values": out["pixel_values"].float(),
            "num_local_patches": torch.tensor([n_local], dtype=torch.long),
        }
        if n_local:
            tensors["pixel_values_local"] = out["pixel_values_local"].float()
        return ImageInputs(tensors=tensors, num_image_tokens=self.global_tokens + self.tile_tokens * n_local + 1)


class DeepseekOCR2Family(ModelFamily):
    """DeepSeek-OCR-2 through ``DeepseekOcr2ForConditionalGeneration``."""

    name = "deepseek_ocr2"
    image_modes = OCR2_MODES
    default_image_mode = "gundam"
    supports_logits_to_keep = True
    vision_module_names = ("vision_tower", "multi_modal_projector")

    def load_tokenizer(self, name_or_path: str, revision: str | None = None):
        """Load the checkpoint's tokenizer with byte-level ids intact (see ``tokenizer.load_tokenizer``)."""
        return load_tokenizer(name_or_path, revision)

    def load_model(self, name_or_path, revision=None, dtype=None, attn_implementation=None):
        """``DeepseekOcr2ForConditionalGeneration.from_pretrained`` from a hub id or folder."""
        from transformers import DeepseekOcr2ForConditionalGeneration

        model = DeepseekOcr2ForConditionalGeneration.from_pretrained(
            name_or_path, revision=revision, dtype=dtype, attn_implementation=attn_implementation
        )
        if model.config.model_type != "deepseek_ocr2":
            raise ValueError(
                f"{name_or_path!r} is a {model.config.model_type!r} checkpoint, not deepseek_ocr2. "
                "To fix: set model.family to match the checkpoint."
            )
        return model

    def image_processor(self, model, image_mode: str, revision: str | None = None) -> ImageProcessor:
        """The checkpoint's own image-processor settings (``preprocessor_config.json``) plus the mode.

        A checkpoint without a readable ``preprocessor_config.json`` is an error: the processor's class
        defaults are not guaranteed to be the checkpoint's sizes, and a silent fallback would train and
        evaluate on other pixels than the model was made for.
        """
        from transformers import DeepseekOcr2ImageProcessorPil

        source = getattr(model, "name_or_path", None) or model.config._name_or_path
        try:
            hf = DeepseekOcr2ImageProcessorPil.from_pretrained(source, revision=revision)
        except OSError as e:
            raise ValueError(
                f"cannot read the image processor settings (preprocessor_config.json) of {source!r}"
                f"{f' at revision {revision!r}' if revision else ''}: {e}. To fix: copy preprocessor_config.json "
                "from the hub checkpoint (deepseek-community/DeepSeek-OCR-2) into that folder."
            ) from None
        return DeepseekOCR2ImageProcessor(hf, model.config.vision_config, image_mode)

    def collate_images(self, images: list[ImageInputs]) -> dict[str, torch.Tensor]:
        """Global views stacked, tiles of all images concatenated, tile counts per image."""
        if not images:
            return {}
        batch = {
            "pixel_values": torch.cat([im.tensors["pixel_values"] for im in images]),
            "num_local_patches": torch.cat([im.tensors["num_local_patches"] for im in images]),
        }
        local = [im.tensors["pixel_values_local"] for im in images if "pixel_values_local" in im.tensors]
        if local:
            batch["pixel_values_local"] = torch.cat(local)
        return batch

    def image_token_id(self, model) -> int:
        """``config.image_token_id`` (128815 in the official checkpoint)."""
        return int(model.config.image_token_id)

    def lora_targets(self, model, module_names: list[str]) -> dict[str, Any]:
        """Regex on the language model's Linear layers + PEFT parameter targeting of the fused experts.

        The routed experts are fused 3-D Parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
        ``target_parameters`` adapts them (one adapter over gate+up, docs/MODEL_NOTES.md §5).
        """
        names = "|".join(sorted(module_names))
        target_parameters = []
        if {"gate_proj", "up_proj"} & set(module_names):
            target_parameters.append("mlp.experts.gate_up_proj")
        if "down_proj" in module_names:
            target_parameters.append("mlp.experts.down_proj")
        return {
            "target_modules": rf".*language_model.*\.({names})",
            "target_parameters": target_parameters or None,
        }

    def make_tiny(self, out_dir: Path, seed: int = 0) -> None:
        """A ~17 M-parameter random OCR-2 (the real 129,280 vocab) that reads 128 px images."""
        from transformers import (
            DeepseekOcr2Config,
            DeepseekOcr2ForConditionalGeneration,
            DeepseekOcr2ImageProcessorPil,
        )

        tok = build_offline_tokenizer()
        config = DeepseekOcr2Config(
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            text_config=dict(
                vocab_size=129280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                n_routed_experts=4, n_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                moe_intermediate_size=32, num_experts_per_tok=2, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            vision_config=dict(
                # 128 px / patch 8 = 16x16 patches, two stride-2 convs -> 4x4: the 144-query table.
                sam_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                                image_size=128, patch_size=8, window_size=4, global_attn_indexes=[1],
                                downsample_channels=[32, 64],
                                # The class default (1e-10) makes a random SAM output ~1e-40: no image signal.
                                initializer_range=0.02),
                encoder_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
            ),
        )
        torch.manual_seed(seed)
        model = DeepseekOcr2ForConditionalGeneration(config).float()
        scale_tiny_output_head(model, seed=seed)
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        # Global view 128 px; tiles of 96 px when a side exceeds 96 (the official 1024/768 ratio).
        DeepseekOcr2ImageProcessorPil(size={"height": 128, "width": 128}, tile_size=96).save_pretrained(out_dir)
        (out_dir / "TINY_RANDOM_MODEL.json").write_text(
            json.dumps({"family": self.name, "seed": seed, "note": "random weights, for tests and the demo"})
        )
