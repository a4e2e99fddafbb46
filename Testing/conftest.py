"""Shared fixtures: a tiny randomly initialised network, its weights on disk, small volumes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("WEAKICL_DATA", REPO.parent / "shared" / "data"))


def tiny_config():
    from weakicl.network import NetConfig

    return NetConfig(channels=(4, 8, 16), query_tokens=2, attention_heads=2, task_layers=1, patch_size=(16, 16, 16))


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from weakicl.network import WeakICLNet

    torch.manual_seed(0)
    return WeakICLNet(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_weights(tiny_model, tmp_path_factory) -> Path:
    from weakicl.weights import save_weights

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_weights(tiny_model, path, {"name": "tiny-test"})


def oblique_geometry(shape_kji=(12, 20, 18), spacing=(0.9, 1.1, 2.5)):
    from weakicl.volume import Geometry

    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Geometry(spacing, (10.0, -20.0, 5.0), rotation, shape_kji)


def ellipsoid(shape_kji, centre_kji, radii_kji) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_kji, radii_kji)) <= 1.0


@pytest.fixture()
def phantom():
    """A small MR-like volume with an ellipsoid structure, on an oblique anisotropic grid."""
    from weakicl.volume import Volume

    geometry = oblique_geometry()
    truth = ellipsoid(geometry.shape_kji, (6, 10, 9), (4, 6, 5))
    rng = np.random.default_rng(1)
    image = (100 * truth + rng.normal(0, 10, truth.shape)).astype(np.float32)
    return Volume(image, geometry, "MR"), truth


def require_shared_data() -> Path:
    if not (SHARED_DATA / "manifest.json").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def weakicl_log():
    """Messages of the "weakicl" logger during a test (caplog misses them once `weakicl.cli.main` has
    configured that logger not to propagate)."""
    import logging

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("weakicl")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def application_scene(crosshair: bool = False):
    """An MRML scene with the singletons Slicer's application adds (selection and interaction nodes,
    and the crosshair that slice views place through), so module code sees what it sees in Slicer."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for class_name in ("vtkMRMLSelectionNode", "vtkMRMLInteractionNode"):
        node = scene.CreateNodeByClass(class_name)
        node.SetSingletonTag("Singleton")
        scene.AddNode(node)
    if crosshair:
        scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    return scene
