"""Shared test helpers: the fixtures in ../shared and small random models."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "fixtures" / "reference"
DATASETS = SHARED / "datasets"
REFSHIM = SHARED / "tools" / "refshim"

needs_shared = pytest.mark.skipif(
    not (REFERENCE / "manifest.json").is_file(),
    reason="../shared/fixtures/reference is absent (a clone outside the segany workplace)",
)


def manifest() -> dict:
    return json.loads((REFERENCE / "manifest.json").read_text())


def case_image_path(name: str) -> Path:
    images = manifest()["images"]
    if images.get(name):
        return REFERENCE / images[name]
    dataset, image_id = name.rsplit("_", 1)
    folder = DATASETS / dataset / "images"
    return next(folder.glob(f"{image_id}.*"))


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def import_reference(package: str):
    """Import a reference package (test oracle only) through ../shared/tools/refshim."""
    if not REFSHIM.is_dir():
        pytest.skip("../shared/tools/refshim is absent")
    if str(REFSHIM) not in sys.path:
        sys.path.insert(0, str(REFSHIM))
    return pytest.importorskip(package, reason=f"reference package {package} is not installed")


@pytest.fixture(scope="session")
def tiny_sam():
    """A small random SAM (ViT embed 32, depth 2) for fast unit tests."""
    from segany.modeling import ImageEncoderConfig, SamConfig, build_sam

    torch.manual_seed(0)
    cfg = SamConfig(encoder=ImageEncoderConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)))
    return build_sam(cfg)


@pytest.fixture(scope="session")
def tiny_net(tiny_sam):
    """tiny_sam's engine twin (segany.engine.twin): the same weights through the inference paths."""
    from segany.engine.twin import twin

    return twin(tiny_sam)


@pytest.fixture(scope="session")
def fixture_sam():
    if not (REFERENCE / "sam_vit_small.pth").is_file():
        pytest.skip("../shared/fixtures/reference is absent")
    import segany

    return segany.load_model(REFERENCE / "sam_vit_small.pth")
