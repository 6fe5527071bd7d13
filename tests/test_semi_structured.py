import pytest
import torch
from torch import nn

from lightning_compress.pruning.masks import nm_masks
from lightning_compress.pruning.semi_structured import (
    is_two_four_sparse,
    semi_structured_eligibility,
    to_semi_structured,
)


def test_two_four_pattern_detection_matches_nm_masks():
    weight = torch.randn(64, 128)
    assert not is_two_four_sparse(weight)
    mask = nm_masks({"w": weight}, 2, 4)["w"]
    assert is_two_four_sparse(weight * mask)
    assert not is_two_four_sparse(torch.randn(4, 6))  # input dimension not a multiple of 4


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv2d(4, 4, 3), "not an nn.Linear"),
        (nn.Linear(64, 64), "need a CUDA GPU"),
    ],
)
def test_ineligible_layers_say_why(layer, match):
    assert match in semi_structured_eligibility(layer)


def test_strict_conversion_fails_clearly_on_cpu():
    with pytest.raises(ValueError, match="Layer '0' cannot use the 2:4 sparse kernels: the weight is on cpu"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)), strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_converted_layer_matches_the_dense_pruned_layer_on_gpu():
    layer = nn.Linear(256, 128).cuda().half()
    with torch.no_grad():
        layer.weight.mul_(nm_masks({"w": layer.weight}, 2, 4)["w"])
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    expected = layer(x)
    model = nn.Sequential(layer)
    assert to_semi_structured(model, strict=True) == {}
    assert torch.allclose(model(x), expected, atol=1e-2, rtol=1e-2)
