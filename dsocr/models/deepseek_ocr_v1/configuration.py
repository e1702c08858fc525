"""Configuration of native DeepSeek-OCR v1 (docs/MODEL_NOTES.md §1).

Reads the OFFICIAL ``config.json`` of ``deepseek-ai/DeepSeek-OCR`` as it is: the language-model keys sit at the
top level and again under ``language_config`` (top level wins); ``vision_config`` and ``projector_config``
there are informational only, because the official code hard-codes the vision towers. Here every vision
size is a field of its own whose default is the official hard-coded value, so tests can build tiny towers.

Saving keeps ``model_type = "deepseek_vl_v2"`` (what vLLM looks for) and writes ``language_config`` again,
regenerated from the top-level fields so the two copies can never disagree.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

# LM fields mirrored into ``language_config`` on save (vLLM builds its DeepseekV2Config from that dict).
_LANGUAGE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "topk_method", "n_group", "topk_group", "norm_topk_prob",
    "scoring_func", "routed_scaling_factor", "aux_loss_alpha", "seq_aux", "max_position_embeddings",
    "rms_norm_eps", "use_mla", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
    "qk_nope_head_dim", "bos_token_id", "eos_token_id", "lm_head", "rm_head",
)


class DeepseekOCRConfig(PreTrainedConfig):
    r"""Configuration of ``DeepseekOCRForCausalLM`` (DeepSeek-OCR v1: SAM-B + CLIP-L + DeepSeek-V2 MoE decoder).

    Defaults are the official model's values (``config.json`` plus the sizes hard-coded in its remote code).

    Language model (DeepSeek-V2, plain multi-head attention, ``use_mla`` false):
        vocab_size: Rows of ``embed_tokens`` and ``lm_head`` (129,280; the tokenizer uses 128,827 of them).
        hidden_size: LM width (1280). Also the projector's output width and the size of ``image_newline``.
        intermediate_size: Width of the dense SiLU-gated MLP of the first ``first_k_dense_replace`` layers (6848).
        moe_intermediate_size: Width of each routed expert (896); shared experts use
            ``moe_intermediate_size * n_shared_experts``.
        num_hidden_layers: Decoder layers (12).
        num_attention_heads: Query heads (10, head_dim = hidden_size / heads = 128).
        num_key_value_heads: Key/value heads (10: plain MHA).
        head_dim: Per-head width; ``None`` means ``hidden_size // num_attention_heads``.
        n_routed_experts: Routed experts per MoE layer (64), one ``nn.Linear`` triple each.
        num_experts_per_tok: Experts each token is routed to (6).
        n_shared_experts: Shared experts folded into one MLP of width ``n * moe_intermediate_size`` (2).
        first_k_dense_replace: The first k layers use the dense MLP instead of MoE (1).
        moe_layer_freq: Every n-th layer after those is MoE (1 = all of them).
        topk_method: Only ``"greedy"`` (plain top-k over the softmax scores) is implemented.
        n_group, topk_group: Group-limited routing parameters; must be 1 (no grouping), as in the checkpoint.
        norm_topk_prob: Renormalise the top-k weights (false in the checkpoint: weights stay raw softmax).
        scoring_func: Router scoring; only ``"softmax"`` (computed in fp32).
        routed_scaling_factor: Multiplies the routed output when ``norm_topk_prob`` is false (1.0).
        aux_loss_alpha: Weight of the sequence-level load-balancing loss (0.001 in the checkpoint).
        seq_aux: Use the per-sequence form of the balancing loss (true) or the batch form.
        add_aux_loss: Whether the balancing loss is ADDED to the returned loss in training. Default false,
            which matches what the official code effectively optimises for LoRA users (its hook adds only a
            gradient, never a logged loss term); turn it on to train routers with balancing.
        max_position_embeddings: Longest supported sequence (8192).
        rms_norm_eps: RMSNorm epsilon (1e-6).
        rope_parameters: RoPE settings; defaults to ``{"rope_type": "default", "rope_theta": 10000.0}``.
        hidden_act: Activation of all LM MLPs (``"silu"``).
        attention_bias: Bias on q/k/v/o projections (false).
        attention_dropout: Attention dropout probability (0.0).
        mlp_bias: Bias on the LM MLPs (false; needed by the reused transformers MLP block).
        initializer_range: Std of the normal init used for fresh (random) weights.
        use_cache: Return a KV cache by default.
        tie_word_embeddings: Must stay false: ``lm_head`` is a separate matrix in the checkpoint.
        bos_token_id, eos_token_id, pad_token_id: 0, 1 and 2 (``<｜▁pad▁｜>``) in DeepSeek-OCR's tokenizer.
        image_token_id: Id of the ``<image>`` slot token (128815).
        use_mla, kv_lora_rank, q_lora_rank, qk_rope_head_dim, v_head_dim, qk_nope_head_dim, lm_head, rm_head:
            Official keys kept for round trips; MLA is not supported (``use_mla`` must be false).

    SAM-ViT-B encoder (``model.sam_model``):
        sam_image_size: Image side the absolute position table was trained for (1024); other sizes resize it.
        sam_patch_size: Patch side of the patch-embedding convolution (16).
        sam_width: Transformer width (768).
        sam_depth: Number of blocks (12).
        sam_heads: Attention heads (12).
        sam_mlp_ratio: MLP width = ``sam_width * sam_mlp_ratio`` (4.0 → 3072).
        sam_window_size: Window side of windowed-attention blocks (14).
        sam_global_attn_indexes: Blocks with global attention over the whole grid (2, 5, 8, 11).
        sam_out_chans: Neck output channels (256).
        sam_downsample_channels: Channels of the two stride-2 compressor convs ``net_2``, ``net_3`` (512, 1024).
            The last one must equal ``clip_width``: the compressed SAM map is CLIP's input.
        sam_layer_norm_eps: Epsilon of the blocks' LayerNorms and the neck LayerNorm2d (1e-6).

    CLIP-L encoder (``model.vision_model``), fed the SAM map instead of its own patch conv:
        clip_width: Width (1024).
        clip_layers: Transformer layers (24).
        clip_heads: Attention heads (16).
        clip_mlp_dim: MLP width (4096, quick-GELU).
        clip_image_size, clip_patch_size: Define the (unused) patch conv and the position table:
            ``(clip_image_size // clip_patch_size) ** 2 + 1`` positions (224, 14 → 257).
        clip_layer_norm_eps: LayerNorm epsilon (1e-5).

    Projector (``model.projector``):
        projector_input_dim: ``clip_width + sam_downsample_channels[-1]`` (2048), the concatenated features.

    Speed switch (not an official key; changes no weight and no result beyond float rounding):
        moe_implementation: ``"grouped"`` (default) runs all routed experts of a layer as grouped GEMMs (base
            weights stacked, each expert's PEFT LoRA A/B kept and stacked; no host sync); ``"loop"`` calls the
            expert modules one by one in Python (the reference; what the official code does). Unsupported PEFT
            setups (DoRA, LoRA dropout > 0 in training, ...) use the loop automatically.

    Training switch:
        train_vision: If true, SAM, CLIP, the projector, ``image_newline`` and ``view_seperator`` keep
            ``requires_grad=True``; if false (default) they are frozen. The forward never uses ``no_grad``.

    Informational official keys (kept, not read): ``vision_config``, ``projector_config``,
    ``candidate_resolutions``, ``global_view_pos``, ``tile_tag``.
    """

    model_type = "deepseek_vl_v2"
    keys_to_ignore_at_inference = ["past_key_values"]

    # --- language model
    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int | None = 10
    head_dim: int | None = None
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int | None = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    add_aux_loss: bool = False
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    image_token_id: int = 128815
    use_mla: bool = False
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    qk_nope_head_dim: int = 0
    lm_head: bool = True
    rm_head: bool = False
    # --- SAM
    sam_image_size: int = 1024
    sam_patch_size: int = 16
    sam_width: int = 768
    sam_depth: int = 12
    sam_heads: int = 12
    sam_mlp_ratio: float = 4.0
    sam_window_size: int = 14
    sam_global_attn_indexes: list[int] | tuple[int, ...] = (2, 5, 8, 11)
    sam_out_chans: int = 256
    sam_downsample_channels: list[int] | tuple[int, ...] = (512, 1024)
    sam_layer_norm_eps: float = 1e-6
    # --- CLIP
    clip_width: int = 1024
    clip_layers: int = 24
    clip_heads: int = 16
    clip_mlp_dim: int = 4096
    clip_image_size: int = 224
    clip_patch_size: int = 14
    clip_layer_norm_eps: float = 1e-5
    # --- projector
    projector_input_dim: int = 2048
    # --- speed
    moe_implementation: str = "grouped"
    # --- training
    train_vision: bool = False

    def __post_init__(self, **kwargs):
        # language_config is regenerated from the top-level fields in to_dict(); from_dict() already merged it.
        kwargs.pop("language_config", None)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.sam_global_attn_indexes = list(self.sam_global_attn_indexes)
        self.sam_downsample_channels = list(self.sam_downsample_channels)
        super().__post_init__(**kwargs)
        problems = []
        if self.use_mla:
            problems.append("use_mla=true (multi-head latent attention) is not implemented; v1 uses plain MHA")
        if self.topk_method != "greedy" or self.n_group != 1 or self.topk_group != 1:
            problems.append(f"routing topk_method={self.topk_method!r}, n_group={self.n_group}, "
                            f"topk_group={self.topk_group}: only greedy with 1/1 groups is implemented")
        if self.scoring_func != "softmax":
            problems.append(f"scoring_func={self.scoring_func!r}: only 'softmax' is implemented")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=true: DeepSeek-OCR's lm_head is untied")
        if self.sam_downsample_channels[-1] != self.clip_width:
            problems.append(f"sam_downsample_channels[-1]={self.sam_downsample_channels[-1]} must equal "
                            f"clip_width={self.clip_width} (the SAM map is CLIP's input)")
        if self.projector_input_dim != self.clip_width + self.sam_downsample_channels[-1]:
            problems.append(f"projector_input_dim={self.projector_input_dim} must be clip_width + "
                            f"sam_downsample_channels[-1] = {self.clip_width + self.sam_downsample_channels[-1]}")
        if self.moe_implementation not in ("grouped", "loop"):
            problems.append(f"moe_implementation={self.moe_implementation!r} must be 'grouped' or 'loop'")
        if problems:
            raise ValueError("invalid DeepseekOCRConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Build the config from a ``config.json`` dict, filling LM keys missing at top level from ``language_config``.

        Args:
            config_dict: The parsed ``config.json`` (official or saved by us).
            **kwargs: Passed on to ``PreTrainedConfig.from_dict``.

        Returns:
            The config (and unused kwargs when ``return_unused_kwargs`` is set), as in transformers.
        """
        config_dict = dict(config_dict)
        language = config_dict.get("language_config") or {}
        for key, value in language.items():
            if key in _LANGUAGE_KEYS and key not in config_dict:
                config_dict[key] = value
        # The official class wrote model_type "DeepseekOCR"; the hub file says deepseek_vl_v2. Both are ours.
        config_dict.pop("model_type", None)
        # auto_map points at the hub's remote-code files; a folder we save has none, and we never need them.
        config_dict.pop("auto_map", None)
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Serialise, adding ``language_config`` (a copy of the LM fields) for vLLM's ``deepseek_vl_v2`` loader."""
        output = super().to_dict()
        output["language_config"] = {key: output[key] for key in _LANGUAGE_KEYS if key in output}
        return output


__all__ = ["DeepseekOCRConfig"]
