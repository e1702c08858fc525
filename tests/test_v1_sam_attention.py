"""SAM attention with the relative-position bias folded into the dot product == the materialised bias."""

from __future__ import annotations

import pytest
import torch

from dsocr.models.deepseek_ocr_v1.configuration import DeepseekOCRConfig
from dsocr.models.deepseek_ocr_v1.modeling import SamAttention


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (10, 6)])  # a window, a global grid, a non-square map
def test_folded_bias_equals_materialised_bias(grid):
    torch.manual_seed(0)
    attn = SamAttention(DeepseekOCRConfig(sam_width=64, sam_heads=4), rel_size=max(grid)).float()
    with torch.no_grad():  # the checkpoint's tables are far from zero; random ones make the bias matter
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(3, *grid, 64)
    attn.materialize_bias = True
    reference = attn(x)
    attn.materialize_bias = False
    folded = attn(x)
    torch.testing.assert_close(folded, reference, atol=2e-6, rtol=1e-5)
    # The bias really matters here: without it the output differs by far more than the tolerance.
    with torch.no_grad():
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
    assert (attn(x) - reference).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's kernels are compiled for CUDA")
@pytest.mark.parametrize("grid,batch", [((14, 14), 50), ((64, 64), 2), ((40, 40), 3), ((64, 64), 5)])
def test_flex_attention_equals_materialised_bias_on_cuda(grid, batch):
    """model.flex_vision_attention: the same attention, bf16 on CUDA, a window and global grids (1024 px, 640 px
    tiles), two batch sizes of one grid (the second call reuses or extends the compiled kernel)."""
    torch.manual_seed(0)
    attn = SamAttention(DeepseekOCRConfig(sam_width=768, sam_heads=12), rel_size=max(grid)).cuda().bfloat16()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(batch, *grid, 768, device="cuda", dtype=torch.bfloat16)
        attn.float().materialize_bias = True
        reference = attn(x.float())  # float32, the bias materialised
        attn.bfloat16().materialize_bias = False
        folded = attn(x).float()
        attn.use_flex = True
        flex = attn(x).float()
    folded_err = (folded - reference).abs().max().item()
    flex_err = (flex - reference).abs().max().item()
    assert flex_err <= max(2 * folded_err, 1e-2), (flex_err, folded_err)
    # Gradients need the folded path: with grad enabled and trainable weights the flex path is not taken.
    attn.use_flex = True
    y = attn(x)
    assert y.requires_grad
