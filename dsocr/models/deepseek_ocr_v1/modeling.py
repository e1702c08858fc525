"""Native DeepSeek-OCR v1 for transformers 5.x (docs/MODEL_NOTES.md §1-§4), state-dict compatible with the hub checkpoint.

Module tree = official key names (``model.sam_model.*``, ``model.vision_model.*``, ``model.projector.layers``,
``model.image_newline``, ``model.view_seperator`` (sic), ``model.embed_tokens``, ``model.layers.N.*`` with one
``nn.Linear`` triple per routed expert, ``model.norm``, untied ``lm_head``), so ``from_pretrained`` loads
``deepseek-ai/DeepSeek-OCR`` without ``trust_remote_code`` and ``save_pretrained`` writes the same layout.

What differs from the official remote code, on purpose (docs/MODEL_NOTES.md §4):

* no ``torch.no_grad`` around vision: the towers are frozen through ``requires_grad`` (``config.train_vision``);
* image features are written out of place (``masked_scatter``, not ``masked_scatter_``), cast to the
  embedding dtype/device, after a hard per-row check that slots == feature rows;
* the vision towers run batched over all global views, then over all tiles, of a batch;
* the loss shifts unshifted labels, runs the fp32 cross-entropy only on supervised positions, and honours
  ``num_items_in_batch``; the MoE balancing loss is an explicit config switch (``add_aux_loss``);
* SDPA attention (eager also works), KV cache, batched left-padded ``generate``; no prints, no ``.cuda()``.

The decoder reuses transformers' DeepSeek-OCR-2 text blocks (attention, SiLU MLP, RMSNorm, rotary): the OCR-2
decoder is the same DeepSeek-V2 MHA decoder as v1 (checked against the official v1 numbers by
``tests/test_v1_golden_forward.py``); only the MoE block is ours, to keep one Linear per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2TextAttention,
    DeepseekOcr2TextMLP,
    DeepseekOcr2TextRMSNorm,
    DeepseekOcr2TextRotaryEmbedding,
)

from .configuration import DeepseekOCRConfig
from .grouped_experts import POOL_ATTR, GroupedExperts, pool_expert_lora, repoint_if_moved
from .processing import normalize_pixels

# ============================================================================================================
# SAM-ViT-B (``model.sam_model``)
# ============================================================================================================


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a relative-position table ``[L, C]`` to ``[length, C]`` (no-op when it already fits)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")
    return resized[0].t().to(rel_pos.dtype)


def _rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather ``[size, size, C]`` embeddings of the offsets ``q - k`` for a square query/key extent ``size``."""
    table = _resize_rel_pos(rel_pos, 2 * size - 1)
    coords = torch.arange(size, device=rel_pos.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


def _attention_with_folded_bias(q, k, v, rel_h, rel_w) -> torch.Tensor:
    """``softmax(q·kᵀ/√d + bias) v`` with SAM's decomposed bias folded into the dot product, never materialised.

    ``bias[q, k] = rel_h[q, kh] + rel_w[q, kw]`` is a dot product of ``A[q] = [rel_h[q, :], rel_w[q, :]]``
    with a one-hot code of the key's row and column, ``E[k] = onehot(kh) ⊕ onehot(kw)``. Appending ``A·√d``
    to the queries and ``E`` to the keys, with the scale fixed at ``1/√d``, gives exactly the biased scores,
    so the fused SDPA kernels (flash / memory-efficient) run with no ``[B, heads, HW, HW]`` bias tensor: at
    Gundam batch 64 that bias is 25 GB in bf16 per global block, written and read at every forward. The extra
    head width (h + w) costs far less than that traffic; ``√d`` is a power of two for SAM-B (d = 64), so the
    scaled ``A`` is exact in bf16.

    Args:
        q: Queries ``[B, heads, h*w, d]``.
        k: Keys, same shape.
        v: Values, same shape.
        rel_h: The height term ``[B*heads, h, w, h]``.
        rel_w: The width term ``[B*heads, h, w, w]``.
    """
    b, nh, n, d = q.shape
    h, w = rel_h.shape[1], rel_h.shape[2]
    extra = h + w
    pad = (-(d + extra)) % 8  # fused kernels want head widths that are multiples of 8
    scale = d**-0.5
    a = torch.cat([rel_h, rel_w], dim=-1).reshape(b, nh, n, extra) * (1.0 / scale)
    rows = torch.arange(n, device=q.device) // w
    cols = torch.arange(n, device=q.device) % w
    code = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(k.dtype)  # [n, h + w]
    parts_q, parts_k = [q, a.to(q.dtype)], [k, code.expand(b, nh, n, extra)]
    if pad:
        parts_q.append(q.new_zeros(b, nh, n, pad))
        parts_k.append(k.new_zeros(b, nh, n, pad))
    q2, k2 = torch.cat(parts_q, dim=-1), torch.cat(parts_k, dim=-1)
    if q.is_cuda:
        # Flash attention wants value as wide as query and key: pad with zeros, slice the output back.
        v2 = torch.cat([v, v.new_zeros(b, nh, n, q2.shape[-1] - d)], dim=-1)
        return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :d]
    return F.scaled_dot_product_attention(q2, k2, v, scale=scale)


_FLEX_ATTENTION = None


def _compiled_flex_attention():
    """``flex_attention`` compiled once per process (Triton kernels; eager flex would materialise the scores)."""
    global _FLEX_ATTENTION
    if _FLEX_ATTENTION is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_ATTENTION = torch.compile(flex_attention)
    return _FLEX_ATTENTION


def _attention_flex(q, k, v, rel_h, rel_w) -> torch.Tensor:
    """The same biased attention as ``_attention_with_folded_bias`` through FlexAttention, at head width ``d``.

    The folded form pays for its bias with ``h + w`` extra query/key columns (and a value padded to match for
    flash): at 1024 px a global block runs at width 192 instead of 64, three times the attention FLOPs, plus
    the concatenations. Here the kernel adds ``rel_h[q, k // w] + rel_w[q, k % w]`` to each score as it goes.
    Forward only: used when nothing needs a gradient through the attention (frozen vision, evaluation).
    """
    b, nh, n, _ = q.shape
    h, w = rel_h.shape[1], rel_h.shape[2]
    rel_h, rel_w = rel_h.reshape(b, nh, n, h), rel_w.reshape(b, nh, n, w)

    def score_mod(score, bi, hi, qi, ki):
        return score + rel_h[bi, hi, qi, ki // w] + rel_w[bi, hi, qi, ki % w]

    return _compiled_flex_attention()(q, k, v, score_mod=score_mod)


class SamAttention(nn.Module):
    """Multi-head attention with decomposed relative positions (height and width), as in SAM / MViTv2."""

    def __init__(self, config: DeepseekOCRConfig, rel_size: int):
        super().__init__()
        self.num_heads = config.sam_heads
        self.head_dim = config.sam_width // config.sam_heads
        self.qkv = nn.Linear(config.sam_width, 3 * config.sam_width)
        self.proj = nn.Linear(config.sam_width, config.sam_width)
        # The checkpoint stores 2*14-1 = 27 offsets for windowed blocks, 2*64-1 = 127 for global ones.
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        # True: the reference formulation with the [B, heads, HW, HW] bias materialised (for tests).
        self.materialize_bias = False
        # True: FlexAttention on CUDA when no gradient flows through here (model.flex_vision_attention).
        self.use_flex = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within each ``[B, H, W, C]`` map (a window or the whole grid)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, HW, d]
        # Decomposed relative-position bias from the *unscaled* queries: bias[q, k] = q·Rh[qh-kh] + q·Rw[qw-kw].
        rq = q.reshape(b * self.num_heads, h, w, self.head_dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, _rel_pos_table(h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, _rel_pos_table(w, self.rel_pos_w))
        if self.materialize_bias:
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif self.use_flex and q.is_cuda and not (torch.is_grad_enabled() and (q.requires_grad or rel_h.requires_grad)):
            out = _attention_flex(q, k, v, rel_h, rel_w)
        else:
            out = _attention_with_folded_bias(q, k, v, rel_h, rel_w)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class SamMLP(nn.Module):
    """GELU MLP of a SAM block."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        hidden = int(config.sam_width * config.sam_mlp_ratio)
        self.lin1 = nn.Linear(config.sam_width, hidden)
        self.lin2 = nn.Linear(hidden, config.sam_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply lin1 → GELU (erf) → lin2."""
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(GradientCheckpointingLayer):
    """Pre-LN ViT block; windowed attention (zero-padded to whole windows) unless ``window_size == 0``."""

    def __init__(self, config: DeepseekOCRConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        grid = config.sam_image_size // config.sam_patch_size
        self.norm1 = nn.LayerNorm(config.sam_width, eps=config.sam_layer_norm_eps)
        self.attn = SamAttention(config, rel_size=window_size if window_size > 0 else grid)
        self.norm2 = nn.LayerNorm(config.sam_width, eps=config.sam_layer_norm_eps)
        self.mlp = SamMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on a ``[B, H, W, C]`` map."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            b, h, w, c = x.shape
            s = self.window_size
            ph, pw = (s - h % s) % s, (s - w % s) % s
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.reshape(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            x = self.attn(x)
            x = x.reshape(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w, :]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, H, W]`` maps (SAM neck)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channel vector (biased variance), then scale and shift."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SamPatchEmbed(nn.Module):
    """Non-overlapping patch convolution (``patch_embed.proj``)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        p = config.sam_patch_size
        self.proj = nn.Conv2d(3, config.sam_width, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` pixels → ``[B, S/p, S/p, C]`` channels-last map (contiguous)."""
        # Contiguous once here: a permuted view would make every residual sum after it inherit its strides,
        # and each LayerNorm and Linear of the trunk copy its input back to contiguous first.
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


class SamEncoder(nn.Module):
    """SAM-ViT-B + neck + the two stride-2 compressor convs: ``[B, 3, S, S]`` → ``[B, 1024, S/64, S/64]``."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        grid = config.sam_image_size // config.sam_patch_size
        self.patch_embed = SamPatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.sam_width))
        self.blocks = nn.ModuleList(
            SamBlock(config, 0 if i in config.sam_global_attn_indexes else config.sam_window_size)
            for i in range(config.sam_depth)
        )
        c, eps = config.sam_out_chans, config.sam_layer_norm_eps
        self.neck = nn.Sequential(
            nn.Conv2d(config.sam_width, c, kernel_size=1, bias=False),
            LayerNorm2d(c, eps),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c, eps),
        )
        c2, c3 = config.sam_downsample_channels
        self.net_2 = nn.Conv2d(c, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        # Views other than 1024 px (512, 640, 1280, tiles) use the table resized bicubic + antialias in fp32.
        pos = self.pos_embed
        if pos.shape[1:3] == (h, w):
            return pos
        resized = F.interpolate(
            pos.permute(0, 3, 1, 2).float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False
        )
        return resized.to(pos.dtype).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, 3, S, S]`` pixels into the compressed ``[B, C3, S/64, S/64]`` map."""
        x = self.patch_embed(pixels)
        x = x + self._pos_embed(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))


# ============================================================================================================
# CLIP-L (``model.vision_model``), fed the SAM map instead of its own patch conv
# ============================================================================================================


class ClipEmbeddings(nn.Module):
    """CLS token + (SAM map tokens) + resized absolute positions.

    ``patch_embedding`` exists only because the checkpoint has it: the model never feeds CLIP pixels.
    The official module also owns a ``position_ids`` buffer (``arange(257)``, absent from the checkpoint);
    here there is none, since embedding ``arange(257)`` is the position table itself.
    """

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.grid = config.clip_image_size // config.clip_patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.clip_width))
        self.patch_embedding = nn.Conv2d(
            3, config.clip_width, kernel_size=config.clip_patch_size, stride=config.clip_patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(self.grid**2 + 1, config.clip_width)

    def _positions(self, h: int, w: int) -> torch.Tensor:
        table = self.position_embedding.weight
        if (h, w) == (self.grid, self.grid):
            return table
        cls_pos, grid_pos = table[:1], table[1:]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2).float()
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        grid_pos = grid_pos.to(table.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)
        return torch.cat([cls_pos, grid_pos], dim=0)

    def forward(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` SAM map → ``[B, 1 + h·w, C]`` tokens with positions."""
        b, _, h, w = patch_maps.shape
        tokens = patch_maps.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(tokens.dtype).expand(b, 1, -1)
        return torch.cat([cls, tokens], dim=1) + self._positions(h, w)[None]


class ClipAttention(nn.Module):
    """Bidirectional multi-head attention with a fused ``qkv_proj`` (layout ``[3, heads, head_dim]``)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.num_heads = config.clip_heads
        self.head_dim = config.clip_width // config.clip_heads
        self.qkv_proj = nn.Linear(config.clip_width, 3 * config.clip_width)
        self.out_proj = nn.Linear(config.clip_width, config.clip_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``[B, S, C]`` tokens."""
        b, s, c = x.shape
        q, k, v = self.qkv_proj(x).reshape(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, c))


class ClipMLP(nn.Module):
    """quick-GELU MLP."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.clip_width, config.clip_mlp_dim)
        self.fc2 = nn.Linear(config.clip_mlp_dim, config.clip_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply fc1 → x·sigmoid(1.702x) → fc2."""
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class ClipLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.clip_width, eps=config.clip_layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.clip_width, eps=config.clip_layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block on ``[B, S, C]`` tokens."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    """Stack of CLIP layers (``transformer.layers``)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(config) for _ in range(config.clip_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run all layers."""
        for layer in self.layers:
            x = layer(x)
        return x


class ClipEncoder(nn.Module):
    """CLIP-L over SAM maps: embeddings → ``pre_layrnorm`` (sic) → layers; no final norm."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.clip_width, eps=config.clip_layer_norm_eps)
        self.transformer = ClipTransformer(config)

    def forward(self, sam_maps: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, 1 + h·w, C]`` (CLS first)."""
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_maps)))


class Projector(nn.Module):
    """Linear 2048 → hidden projector (``projector.layers``)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.layers = nn.Linear(config.projector_input_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project concatenated CLIP+SAM features."""
        return self.layers(x)


# ============================================================================================================
# DeepSeek-V2 MoE decoder
# ============================================================================================================


class DeepseekOCRRouter(nn.Module):
    """Softmax router in fp32 with greedy top-k; its weight is a bare Parameter (``mlp.gate.weight``)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``[T, H]`` tokens.

        Returns:
            ``(topk_idx [T, k] long, topk_weight [T, k] fp32, scores [T, E] fp32)``.
        """
        # fp32 whatever the model dtype: near-tied scores must not flip expert choices under bf16.
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, scores


class DeepseekOCRMoE(nn.Module):
    """Routed experts (one SiLU MLP = one Linear triple each) weighted by the router, plus shared experts.

    The same code runs in train and eval (no separate inference path). Tokens are sorted by expert once.
    ``config.moe_implementation``:

    * ``"grouped"`` (default): each projection of all experts runs as ONE grouped GEMM over the sorted tokens
      (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``; expert offsets stay on the device, so there
      is no host sync), base weights stacked ``[E, out, in]`` (cached while frozen), plus each expert's own
      PEFT LoRA A/B stacked ``[E, r, in]`` / ``[E, out, r]``. The module layout (one ``nn.Linear`` per expert
      projection) is unchanged, so checkpoints and PEFT wrapping (77,509,632 trainable at r=16) are the same.
      Where no grouped kernel fits (CUDA needs bf16 and widths that are multiples of 8; CPU needs 16-byte
      aligned rows) it multiplies expert by expert on the same stacked weights. PEFT setups it cannot express
      (DoRA or other variants, LoRA dropout > 0 in training, LoRA bias, merged-and-disabled adapters) fall
      back to the loop, with one warning.
    * ``"loop"``: the reference — a Python loop calling each expert module (PEFT's own forward), with one
      ``bincount(...).tolist()`` host sync per layer.

    Experts that receive no token get a zero gradient (grouped) or none (loop: under DDP use
    ``find_unused_parameters``).
    """

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            DeepseekOcr2TextMLP(config, intermediate_size=config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        self.gate = DeepseekOCRRouter(config)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = DeepseekOcr2TextMLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )
        #: Balancing loss of the last forward (set only in training with ``config.add_aux_loss``).
        self.aux_loss: torch.Tensor | None = None
        self._grouped = GroupedExperts()  # plain attribute: never in the state dict

    def pool_lora(self) -> int:
        """Pool the experts' LoRA A/B into one Parameter per projection (``grouped_experts.pool_expert_lora``).

        Only for the grouped implementation (the loop calls PEFT's per-expert modules); returns the number of
        pooled tensors, 0 if nothing was pooled.
        """
        if getattr(self.config, "moe_implementation", "grouped") != "grouped":
            return 0
        return pool_expert_lora(self)

    def _balancing_loss(self, topk_idx: torch.Tensor, scores: torch.Tensor, batch: int) -> torch.Tensor:
        # DeepSeek-V2's load-balancing loss (over all positions, padding included, as the official code).
        n_exp, k = scores.shape[-1], self.top_k
        if self.config.seq_aux:
            seq_scores = scores.view(batch, -1, n_exp)
            seq_len = seq_scores.shape[1]
            counts = torch.zeros(batch, n_exp, device=scores.device, dtype=scores.dtype)
            counts = counts.scatter_add(1, topk_idx.view(batch, -1), torch.ones_like(topk_idx.view(batch, -1), dtype=scores.dtype))
            load = counts / (seq_len * k / n_exp)
            return (load * seq_scores.mean(dim=1)).sum(dim=1).mean() * self.config.aux_loss_alpha
        load = F.one_hot(topk_idx.view(-1), n_exp).float().mean(0) * n_exp
        return (scores.mean(0) * load).sum() * self.config.aux_loss_alpha

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the MoE block to ``[B, L, H]`` hidden states."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weight, scores = self.gate(x)

        flat_idx = topk_idx.reshape(-1)
        order = flat_idx.argsort(stable=True)
        token_of = order // self.top_k
        routed_in = x[token_of]
        expert_out = None
        pool = getattr(self, POOL_ATTR, None)
        if pool is not None:
            repoint_if_moved(self)  # after a device/dtype move the saved views must follow the pool
        if getattr(self.config, "moe_implementation", "grouped") == "grouped":
            expert_out = self._grouped.forward(self.experts, routed_in, flat_idx[order], pool)
        elif pool is not None:
            raise RuntimeError("moe_implementation='loop' on a model whose expert adapters are pooled for training "
                               "(their per-expert weights are views without gradients): set it before training starts")
        if expert_out is None:
            counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
            outs = []
            start = 0
            for expert, count in zip(self.experts, counts, strict=True):
                if count:
                    outs.append(expert(routed_in[start : start + count]))
                    start += count
            expert_out = torch.cat(outs, dim=0)
        # Weighted sum in fp32 (the router weights' dtype), then back to the activation dtype, as the official code.
        weighted = expert_out.float() * topk_weight.reshape(-1)[order, None]
        routed = torch.zeros(x.shape, dtype=weighted.dtype, device=x.device).index_add(0, token_of, weighted)
        y = routed.to(hidden_states.dtype).reshape(shape)

        self.aux_loss = None
        if self.training and self.config.add_aux_loss and self.config.aux_loss_alpha > 0:
            self.aux_loss = self._balancing_loss(topk_idx, scores, shape[0])
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


class DeepseekOCRDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: MHA (RoPE) then a dense MLP (first layers) or the MoE block."""

    def __init__(self, config: DeepseekOCRConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekOcr2TextAttention(config, layer_idx)
        is_moe = (
            config.n_routed_experts
            and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0
        )
        self.mlp = DeepseekOCRMoE(config) if is_moe else DeepseekOcr2TextMLP(config)
        self.input_layernorm = DeepseekOcr2TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekOcr2TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run one layer on ``[B, L, H]``."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ============================================================================================================
# Pretrained base, model, causal LM
# ============================================================================================================


class DeepseekOCRPreTrainedModel(PreTrainedModel):
    """Weight init, attention capabilities and the vision freezing switch shared by both classes."""

    config_class = DeepseekOCRConfig
    config: DeepseekOCRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SamBlock", "ClipLayer", "DeepseekOCRDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # the vision towers need an additive rel-pos bias
    _supports_flex_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekOCRRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SamAttention):
            init.zeros_(module.rel_pos_h)
            init.zeros_(module.rel_pos_w)
        elif isinstance(module, SamEncoder):
            init.normal_(module.pos_embed, mean=0.0, std=std)
        elif isinstance(module, ClipEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=std)
        elif isinstance(module, LayerNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DeepseekOCRModel):
            init.normal_(module.image_newline, mean=0.0, std=std)
            init.normal_(module.view_seperator, mean=0.0, std=std)


@dataclass
class DeepseekOCRModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the MoE balancing loss (``None`` unless ``config.add_aux_loss``)."""

    aux_loss: torch.FloatTensor | None = None


class DeepseekOCRModel(DeepseekOCRPreTrainedModel):
    """Vision towers + glue + DeepSeek-V2 decoder (the official ``model.`` prefix)."""

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__(config)
        self.sam_model = SamEncoder(config)
        self.vision_model = ClipEncoder(config)
        self.projector = Projector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self.view_seperator = nn.Parameter(torch.zeros(config.hidden_size))  # sic: the checkpoint's spelling
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekOCRDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekOcr2TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekOcr2TextRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        #: Views per SAM/CLIP call (``None`` = all at once); see ``_encode_views``. Not a config key.
        self.vision_chunk_size: int | None = None
        self.post_init()
        self.set_vision_trainable(config.train_vision)

    def vision_parameters(self) -> list[nn.Parameter]:
        """Parameters of SAM, CLIP, the projector, ``image_newline`` and ``view_seperator``."""
        params = [self.image_newline, self.view_seperator]
        for module in (self.sam_model, self.vision_model, self.projector):
            params.extend(module.parameters())
        return params

    def set_vision_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze the vision side; also recorded in ``config.train_vision``."""
        self.config.train_vision = bool(trainable)
        for param in self.vision_parameters():
            param.requires_grad_(bool(trainable))

    def get_input_embeddings(self) -> nn.Module:
        """Return ``embed_tokens``."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace ``embed_tokens``."""
        self.embed_tokens = value

    # ------------------------------------------------------------------------------------------------ vision
    def _encode_views(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Run SAM → CLIP → projector on a batch of equal-size views: ``[B, 3, S, S]`` → ``[B, h·w, H]``.

        ``self.vision_chunk_size`` (a plain attribute, default ``None`` = all views in one batch) caps how many
        views go through the towers at once: ``1`` reproduces the official one-image-at-a-time schedule (the
        benchmark's baseline), a larger value bounds activation memory (SAM's rel-pos bias is
        ``[views, 12, 4096, 4096]`` per global block at 1024 px).
        """
        chunk = getattr(self, "vision_chunk_size", None)
        if chunk and pixels.shape[0] > chunk:
            parts = [self._encode_views(pixels[i : i + chunk]) for i in range(0, pixels.shape[0], chunk)]
            return torch.cat([p[0] for p in parts], dim=0), parts[0][1], parts[0][2]
        # uint8 from the collator (normalised here, on the device) or already normalised floats.
        pixels = normalize_pixels(pixels).to(dtype=self.sam_model.patch_embed.proj.weight.dtype)
        sam = self.sam_model(pixels)  # [B, C3, h, w]
        clip = self.vision_model(sam)  # [B, 1 + h*w, C]
        feats = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)
        return self.projector(feats), sam.shape[2], sam.shape[3]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_values_local: torch.Tensor | None,
        images_spatial_crop: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Visual feature rows per image, in the official order (docs/MODEL_NOTES.md §3).

        Per image: the tiles as one ``(h_t·h) x (w_t·w)`` grid, row-major, with ``image_newline`` after each
        grid row; then the global ``n x n`` view with a newline after each row; then one ``view_seperator``.

        Args:
            pixel_values: ``[N, 3, S, S]`` global views.
            pixel_values_local: ``[T, 3, t, t]`` tiles of all images in image order, or ``None`` / ``T = 0``.
            images_spatial_crop: ``[N, 2]`` long ``[width_tiles, height_tiles]``; ``[1, 1]`` = no tiles.

        Returns:
            ``N`` tensors ``[rows_i, hidden]``.
        """
        n_images = pixel_values.shape[0]
        crops = images_spatial_crop.tolist()  # tiny [N, 2]; the layout is decided on the host
        if len(crops) != n_images:
            raise ValueError(f"images_spatial_crop has {len(crops)} rows but pixel_values has {n_images} images")
        tiles_per_image = [0 if (w, h) == (1, 1) else w * h for w, h in crops]
        n_tiles = 0 if pixel_values_local is None else pixel_values_local.shape[0]
        if sum(tiles_per_image) != n_tiles:
            raise ValueError(
                f"images_spatial_crop {crops} implies {sum(tiles_per_image)} tiles but pixel_values_local has {n_tiles}"
            )
        # Tiles before global views, the official call order (only matters for hooks / bitwise replays).
        if n_tiles:
            local_feats, lh, lw = self._encode_views(pixel_values_local)
        global_feats, gh, gw = self._encode_views(pixel_values)
        dim = global_feats.shape[-1]
        newline = self.image_newline.to(global_feats.dtype)
        separator = self.view_seperator.to(global_feats.dtype)[None]

        per_image = []
        first_tile = 0
        for i, ((w_t, h_t), n_t) in enumerate(zip(crops, tiles_per_image, strict=True)):
            parts = []
            if n_t:
                grid = local_feats[first_tile : first_tile + n_t].reshape(h_t, w_t, lh, lw, dim)
                grid = grid.permute(0, 2, 1, 3, 4).reshape(h_t * lh, w_t * lw, dim)
                grid = torch.cat([grid, newline.expand(h_t * lh, 1, dim)], dim=1)
                parts.append(grid.reshape(-1, dim))
                first_tile += n_t
            glob = torch.cat([global_feats[i].reshape(gh, gw, dim), newline.expand(gh, 1, dim)], dim=1)
            parts += [glob.reshape(-1, dim), separator]
            per_image.append(torch.cat(parts, dim=0))
        return per_image

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Write image features into the slot positions, out of place, after a hard count check.

        Rows of ``input_ids`` that contain slots take the images in order (one image per such row); each
        row's slot count must equal its image's feature rows.
        """
        slot_mask = input_ids == self.config.image_token_id
        slots_per_row = slot_mask.sum(dim=1).tolist()  # one small host sync, needed to name the numbers
        rows = [(r, n) for r, n in enumerate(slots_per_row) if n]
        feature_rows = [f.shape[0] for f in image_features]
        if len(rows) != len(image_features) or any(n != f for (_, n), f in zip(rows, feature_rows, strict=False)):
            raise ValueError(
                f"image slots do not match visual features: {sum(slots_per_row)} slots "
                f"(token {self.config.image_token_id}) in rows {[r for r, _ in rows]} with counts "
                f"{[n for _, n in rows]}, but {sum(feature_rows)} feature rows for {len(image_features)} "
                f"images with counts {feature_rows}. Check the image mode used to build input_ids."
            )
        feats = torch.cat(image_features, dim=0).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        # masked_scatter (not masked_scatter_): a fresh tensor, safe when embeddings are frozen leaves or
        # outputs of enable_input_require_grads hooks.
        return inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1), feats)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_local: torch.FloatTensor | None = None,
        images_spatial_crop: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DeepseekOCRModelOutput:
        """Embed, write image features (prefill only), run the decoder. See ``DeepseekOCRForCausalLM.forward``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the image slots")
            if images_spatial_crop is None:
                raise ValueError("pixel_values given without images_spatial_crop")
            features = self.get_image_features(pixel_values, pixel_values_local, images_spatial_crop)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, features)
        elif input_ids is not None and (past_key_values is None or past_key_values.get_seq_length() == 0):
            # Prefill without pixels: slots would silently keep the <image> token embedding. Decode steps
            # (non-empty cache) carry no slots and skip this one-number sync.
            n_slots = int((input_ids == self.config.image_token_id).sum())
            if n_slots:
                raise ValueError(
                    f"input_ids contain {n_slots} image slots (token {self.config.image_token_id}) but "
                    "pixel_values is None; pass the images (pixel_values, images_spatial_crop)"
                )

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # From the mask, so left-padded rows start at position 0 exactly like an unpadded row; the
                # mask covers past + current tokens during cached decoding, hence the last seq_len columns.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                past = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device)[None]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        # From the layers, not self.modules(): with LoRA on the experts the tree holds ~26,000 modules, a
        # walk of tens of ms at every forward (every decoding step included).
        aux = [layer.mlp.aux_loss for layer in self.layers
               if isinstance(layer.mlp, DeepseekOCRMoE) and layer.mlp.aux_loss is not None]
        return DeepseekOCRModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=torch.stack(aux).sum() if aux else None,
        )


@dataclass
class DeepseekOCRCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the MoE balancing loss (already included in ``loss`` when enabled)."""

    aux_loss: torch.FloatTensor | None = None


class DeepseekOCRForCausalLM(DeepseekOCRPreTrainedModel, GenerationMixin):
    """DeepSeek-OCR v1 with its LM head: training loss, KV-cached batched generation, official checkpoint I/O."""

    _tied_weights_keys = {}

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__(config)
        self.model = DeepseekOCRModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.model.set_vision_trainable(config.train_vision)

    def get_input_embeddings(self) -> nn.Module:
        """Return ``model.embed_tokens``."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace ``model.embed_tokens``."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        """Return ``lm_head``."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        """Replace ``lm_head``."""
        self.lm_head = value

    def set_vision_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze SAM, CLIP, projector and the two glue vectors (see ``config.train_vision``)."""
        self.model.set_vision_trainable(trainable)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that fails on any missing, unexpected or mismatched key.

        transformers only warns about them, which hides a wrong checkpoint behind random weights.

        Args:
            pretrained_model_name_or_path: Hub id or folder with ``config.json`` + safetensors.
            *args: Passed on.
            **kwargs: Passed on (``revision``, ``dtype``, ``attn_implementation``, ...).

        Returns:
            The model (and the loading info if ``output_loading_info=True`` was asked for).

        Raises:
            ValueError: Naming every missing / unexpected / mismatched key.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = []
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = sorted(str(k) for k in (info.get(kind) or []))
            if keys:
                problems.append(f"{len(keys)} {kind.replace('_', ' ')}: {', '.join(keys[:20])}"
                                + (" ..." if len(keys) > 20 else ""))
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path!r} does not match DeepseekOCRForCausalLM: "
                + "; ".join(problems)
            )
        # Loading may re-create parameters: re-apply the vision switch from the config.
        model.set_vision_trainable(model.config.train_vision)
        return (model, info) if want_info else model

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        # Unshifted labels: position t predicts labels[t + 1]. Only supervised positions reach lm_head, so
        # the fp32 logits are [n_targets, V] instead of [B, L, V] (0.5 GB per 1,000 tokens at V = 129,280).
        labels = labels.to(hidden.device)
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        if num_items_in_batch is None:
            denom = keep.sum().clamp(min=1)
        else:
            denom = num_items_in_batch
            if torch.is_tensor(denom):
                denom = denom.to(loss.device)
        return loss / denom

    @staticmethod
    def _aux_share(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
        """This micro-batch's share of the accumulated batch, by supervised tokens (1 without accumulation).

        With ``num_items_in_batch`` the Trainer sums the micro-batch losses instead of averaging them, which
        is exact for the token loss (each is sum / total). The balancing loss is a mean per micro-batch, so
        it is weighted by the micro-batch's share of the target tokens: summed over the accumulation steps
        it stays one balancing loss per optimizer step, not one per micro-batch.
        """
        if num_items_in_batch is None:
            return 1.0
        mine = (labels[:, 1:] != -100).sum()
        total = num_items_in_batch.to(mine.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return mine / total

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_local: torch.FloatTensor | None = None,
        images_spatial_crop: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> DeepseekOCRCausalLMOutput | tuple:
        """Forward pass (the collator's contract).

        Args:
            input_ids: ``[B, L]`` long; image slots hold ``config.image_token_id``.
            attention_mask: ``[B, L]`` (1 = token, 0 = padding), or ``None``.
            pixel_values: ``[N, 3, S, S]`` global views of the N images; N = rows of ``input_ids`` with slots,
                in row order (text-only rows are allowed). Only on prefill; ``None`` for text-only batches.
            pixel_values_local: ``[T, 3, t, t]`` tiles of all images concatenated in image order, or ``None``.
            images_spatial_crop: ``[N, 2]`` long ``[width_tiles, height_tiles]``; ``[1, 1]`` = no tiles.
            labels: ``[B, L]`` UNshifted targets, ``-100`` ignored; shifted here.
            position_ids: Optional; by default derived from ``attention_mask`` (left padding safe).
            past_key_values: KV cache.
            inputs_embeds: Instead of ``input_ids`` (then no images can be placed).
            use_cache: Return a KV cache (``config.use_cache`` by default; use ``False`` for training).
            output_hidden_states: Return (layer-0 input, each layer's output..., final-norm output).
            return_dict: Return a ``DeepseekOCRCausalLMOutput`` (default) or a tuple.
            logits_to_keep: When logits are computed: only the last ``k`` positions (0 = all), or a 1-D
                tensor of positions. It never affects the loss, which always uses all labelled positions.
            return_logits: Compute ``logits``. Default: only when ``labels`` is ``None`` (with labels the
                loss is computed from the supervised positions alone and ``logits`` is ``None``).
            num_items_in_batch: Supervised-token count of the whole accumulated batch (HF ``Trainer``); the
                loss is then ``sum / num_items_in_batch`` instead of the mean over this micro-batch.
            **kwargs: Passed to the attention implementation.

        Returns:
            ``DeepseekOCRCausalLMOutput`` with ``loss`` (fp32; + balancing loss if ``config.add_aux_loss``),
            ``logits`` (fp32), ``past_key_values``, ``hidden_states``, ``aux_loss``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_values_local=pixel_values_local,
            images_spatial_crop=images_spatial_crop,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = None
        if labels is not None:
            loss = self._loss(hidden, labels, num_items_in_batch)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss * self._aux_share(labels, num_items_in_batch)
        if return_logits is None:
            return_logits = labels is None
        logits = None
        if return_logits:
            if torch.is_tensor(logits_to_keep):  # explicit positions (1-D), as transformers accepts
                kept = hidden[:, logits_to_keep.to(hidden.device)]
            else:
                kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(kept).float()

        if not return_dict:
            out = (logits, outputs.past_key_values, outputs.hidden_states)
            return ((loss,) + out) if loss is not None else out
        return DeepseekOCRCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            aux_loss=outputs.aux_loss,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_local: torch.FloatTensor | None = None,
        images_spatial_crop: torch.LongTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """Standard preparation; pixel inputs only on the prefill step (or every step without a cache)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["pixel_values_local"] = pixel_values_local
            model_inputs["images_spatial_crop"] = images_spatial_crop
        else:
            for key in ("pixel_values", "pixel_values_local", "images_spatial_crop"):
                model_inputs.pop(key, None)
        return model_inputs


__all__ = ["DeepseekOCRForCausalLM", "DeepseekOCRModel", "DeepseekOCRPreTrainedModel"]
