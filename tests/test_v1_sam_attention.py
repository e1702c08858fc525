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
