"""The prompt encoder's sparse embeddings follow the released formula for every label, with and without
the padding token, and stay differentiable."""
from __future__ import annotations

import math

import pytest
import torch

from .smallsam import small_sam


def released_point_embedding(encoder, points, labels, pad):
    """The released formula, written out: PE of the pixel centres (a zero point padded first), the
    not-a-point embedding for label -1, plus the negative / positive type embedding for labels 0 / 1."""
    points = points + 0.5
    if pad:
        points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
    h, w = encoder.input_image_size
    coords = torch.stack([points[..., 0] / w, points[..., 1] / h], dim=-1)
    coords = 2 * math.pi * ((2 * coords - 1) @ encoder.pe_layer.positional_encoding_gaussian_matrix)
    embedding = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)
    labels = labels[..., None]
    embedding = torch.where(labels == -1, encoder.not_a_point_embed.weight, embedding)
    embedding = embedding + torch.where(labels == 0, encoder.point_embeddings[0].weight, 0.0)
    return embedding + torch.where(labels == 1, encoder.point_embeddings[1].weight, 0.0)


@pytest.mark.parametrize("with_box", [False, True])
def test_point_embeddings_follow_the_released_formula_for_every_label(with_box):
    encoder = small_sam(11).prompt_encoder
    torch.manual_seed(3)
    size = encoder.input_image_size[0]
    points = torch.rand(3, 6, 2) * size
    labels = torch.tensor([[-2, -1, 0, 1, 2, 3], [1, 1, 0, 0, -1, 1], [0, 3, 2, 1, -1, 0]])
    boxes = torch.rand(3, 4) * size if with_box else None
    with torch.no_grad():
        sparse, dense = encoder(points=(points, labels), boxes=boxes, masks=None)
        expected = released_point_embedding(encoder, points, labels, pad=not with_box)
    n_points = expected.shape[1]
    assert sparse.shape == (3, n_points + (2 if with_box else 0), encoder.embed_dim)
    torch.testing.assert_close(sparse[:, :n_points], expected, rtol=0, atol=1e-5)
    assert torch.equal(sparse[1, 4], encoder.not_a_point_embed.weight[0].detach())  # label -1: that embedding alone
    assert dense.shape == (3, encoder.embed_dim, *encoder.image_embedding_size)
    with torch.no_grad():  # labels as floats (accepted by the released code) give the same embeddings
        as_floats, _ = encoder(points=(points, labels.float()), boxes=boxes, masks=None)
    assert torch.equal(as_floats, sparse)


def test_point_embeddings_are_differentiable():
    encoder = small_sam(12).prompt_encoder
    points, labels = torch.rand(2, 2, 2) * 200, torch.tensor([[1, 0], [0, 1]])
    sparse, _ = encoder(points=(points, labels), boxes=None, masks=None)
    sparse.square().sum().backward()
    for weight in (encoder.point_embeddings[0].weight, encoder.point_embeddings[1].weight, encoder.not_a_point_embed.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0
