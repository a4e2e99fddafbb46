"""Property-based tests of the prompt reader and the rasteriser (issue 12).

Over random geometries (oblique, left-handed, anisotropic) and both markups coordinate systems, a point
written in physical space lands on the voxel that contains it and an ROI box comes back as drawn; and
no JSON document, however malformed, gives anything but prompts or one InputError (never a traceback).
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from weakicl.errors import InputError
from weakicl.prompts import PromptSet, nearest_voxel, rasterize, read_prompts
from weakicl.volume import LPS_TO_RAS, Geometry

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
unit = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def geometries(draw) -> Geometry:
    """Any rotation (a random unit quaternion), a mirrored axis half the time, spacing 0.2-5 mm."""
    quaternion = np.array(draw(st.tuples(unit, unit, unit, unit)))
    if np.linalg.norm(quaternion) < 0.1:
        quaternion = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    if draw(st.booleans()):
        rotation[:, draw(st.integers(0, 2))] *= -1  # left-handed voxel axes
    spacing = draw(st.tuples(*[st.floats(0.2, 5.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-500.0, 500.0)] * 3))
    shape_kji = draw(st.tuples(*[st.integers(4, 20)] * 3))
    return Geometry(spacing, origin, rotation, shape_kji)


def physical(geometry: Geometry, ijk, system: str) -> np.ndarray:
    return geometry.ijk_to_ras(ijk) if system == "RAS" else geometry.ijk_to_lps(ijk)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


@SETTINGS
@given(geometry=geometries(), system=st.sampled_from(["RAS", "LPS"]), data=st.data())
def test_a_point_lands_on_the_voxel_that_contains_it(folder, geometry, system, data):
    voxel = np.array([data.draw(st.integers(0, n - 1)) for n in geometry.shape_ijk], dtype=float)
    offset = np.array(data.draw(st.tuples(*[st.floats(-0.45, 0.45)] * 3)))
    position = physical(geometry, voxel + offset, system)[0]
    path = folder / "point.mrk.json"
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": system,
                                             "controlPoints": [{"label": "F-1", "position": list(position)}]}]}))
    point = read_prompts(path, geometry).points[0]
    assert [nearest_voxel(c) for c in point.ijk] == voxel.astype(int).tolist()
    channel = rasterize(PromptSet(points=[point]), geometry, point_radius_mm=2 * max(geometry.spacing))[2]
    assert channel.max() > 0
    assert np.unravel_index(np.argmax(channel), channel.shape) == tuple(voxel.astype(int)[::-1])


@SETTINGS
@given(geometry=geometries(), system=st.sampled_from(["RAS", "LPS"]), data=st.data())
def test_an_roi_box_comes_back_as_drawn_and_covers_its_voxels(folder, geometry, system, data):
    shape = np.array(geometry.shape_ijk)
    # at least 3 voxels along every axis: thinner is a box drawn on a slice (prompts.THIN_BOX_VOXELS)
    lo = np.array([data.draw(st.integers(0, n - 4)) for n in shape], dtype=float)
    hi = np.array([data.draw(st.integers(int(a) + 3, n - 1)) for a, n in zip(lo, shape)], dtype=float)
    size = (hi - lo) * np.array(geometry.spacing)
    # one side equal to the shortest other is how Slicer pads a box drawn on a slice (weakicl.slicebox): a 3D box has none
    assume(min(abs(a - b) for a, b in ((size[0], size[1]), (size[1], size[2]), (size[0], size[2]))) > 0.01 * size.max())
    axes = geometry.direction if system == "LPS" else LPS_TO_RAS @ geometry.direction
    roi = {"type": "ROI", "coordinateSystem": system, "center": list(physical(geometry, (lo + hi) / 2, system)[0]),
           "size": list(size), "orientation": list(axes.ravel())}
    path = folder / "box.mrk.json"
    path.write_text(json.dumps({"markups": [roi]}))
    box = read_prompts(path, geometry).boxes[0]
    np.testing.assert_allclose(box.lo_ijk, lo, atol=1e-6)
    np.testing.assert_allclose(box.hi_ijk, hi, atol=1e-6)
    covered = np.argwhere(rasterize(PromptSet([box]), geometry)[0] > 0)[:, ::-1]  # voxel IJK
    assert covered.min(axis=0).tolist() == lo.astype(int).tolist() and covered.max(axis=0).tolist() == hi.astype(int).tolist()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
TEMPLATES = [
    {"markups": [{"type": "ROI", "coordinateSystem": "RAS", "center": [-4.0, -5.0, 6.0], "size": [4.0, 3.0, 0.0],
                  "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}]},
    {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "name": "points",
                  "controlPoints": [{"label": "F-1", "position": [4.0, 5.0, 6.0], "positionStatus": "defined"}]}]},
    {"coordinate_system": "IJK", "boxes": [{"min": [1.0, 2.0, 3.0], "max": [6.0, 7.0, 3.0]}],
     "points": [{"ijk": [4.0, 4.0, 4.0], "positive": False}]},
]


def paths_in(document, prefix=()):
    """Every place in a JSON document where a value can be replaced."""
    places = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            places += paths_in(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            places += paths_in(value, prefix + (index,))
    return places


def replaced(document, path, value):
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def assert_prompts_or_input_error(path, geometry):
    try:
        prompts = read_prompts(path, geometry)
    except InputError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert isinstance(prompts, PromptSet) and not prompts.is_empty()
    for box in prompts.boxes:
        assert geometry.contains_ijk(np.array([box.lo_ijk, box.hi_ijk])).all()
    for point in prompts.points:
        assert geometry.contains_ijk(point.ijk).all()


@SETTINGS
@given(template=st.sampled_from(TEMPLATES), data=st.data())
def test_a_damaged_prompt_file_gives_prompts_or_one_input_error(folder, template, data):
    places = paths_in(template)
    document = template
    for _ in range(data.draw(st.integers(1, 3))):
        places = paths_in(document)
        document = replaced(document, places[data.draw(st.integers(0, len(places) - 1))], data.draw(json_values))
    path = folder / "damaged.mrk.json"
    path.write_text(json.dumps(document))
    assert_prompts_or_input_error(path, Geometry.identity((10, 12, 14)))


@SETTINGS
@given(content=st.binary(max_size=64) | json_values.map(json.dumps).map(str.encode))
def test_any_file_content_gives_prompts_or_one_input_error(folder, content):
    path = folder / "anything.json"
    path.write_bytes(content)
    assert_prompts_or_input_error(path, Geometry.identity((10, 12, 14)))
