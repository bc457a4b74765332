"""The Pixtral tower's block-diagonal attention in one call equals one SDPA call per image."""

import pytest
import torch
import torch.nn.functional as F
from torchtune_mistral3.models.mistral3._attention import _attend_within_images, image_patch_offsets

PATCHES = [5, 12, 1, 7]  # patches per image, one image of a single patch included


def _per_image(q, k, v, patches):
    chunks = zip(q.split(patches, dim=2), k.split(patches, dim=2), v.split(patches, dim=2))
    return torch.cat([F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in chunks], dim=2)


@pytest.mark.parametrize("patches", [PATCHES, [9]])
def test_one_call_equals_one_call_per_image(patches):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, sum(patches), 8, generator=g) for _ in range(3))
    out = _attend_within_images(q, k, v, image_patch_offsets(patches, q.device), dropout_p=0.0, is_causal=False)
    torch.testing.assert_close(out, _per_image(q, k, v, patches), rtol=1e-6, atol=1e-6)


def test_no_image_passes_the_empty_sequence_through():
    q = k = v = torch.zeros(1, 3, 0, 8)
    assert _attend_within_images(q, k, v, image_patch_offsets([], q.device), 0.0, False).shape == (1, 3, 0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length flash attention needs CUDA")
def test_varlen_path_on_cuda_equals_one_call_per_image():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(PATCHES), 64, generator=g, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    out = _attend_within_images(q, k, v, image_patch_offsets(PATCHES, q.device), dropout_p=0.0, is_causal=False)
    ref = _per_image(q, k, v, PATCHES)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
