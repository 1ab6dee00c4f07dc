"""The released-style registry names, and decode options a model does not take."""
import numpy as np
import pytest
import torch

import segany
from segany.modeling.tiny_vit import TinyViT

from .conftest import REFERENCE, needs_shared


def test_vit_t_registry_builds_mobile_sam():
    model = segany.sam_model_registry["vit_t"]()
    assert isinstance(model.image_encoder, TinyViT)
    assert not model.training


@needs_shared
def test_vit_t_registry_loads_the_mobile_sam_checkpoint():
    path = REFERENCE / "mobile_sam_vit_t.pth"
    from_registry = segany.sam_model_registry["vit_t"](checkpoint=path)
    inferred = segany.load_model(path)
    for (name, a), (_, b) in zip(from_registry.state_dict().items(), inferred.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_registry_name():
    with pytest.raises(ValueError, match="unknown model type"):
        segany.sam_model_registry["vit_x"]


def test_decode_option_on_plain_sam_is_a_clear_error(tiny_sam):
    predictor = segany.SamPredictor(tiny_sam)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError, match="hq_token_only"):
        predictor.predict(point_coords=[[10, 10]], point_labels=[1], hq_token_only=True)
