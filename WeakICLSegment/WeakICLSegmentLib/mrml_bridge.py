"""MRML <-> engine conversion: the one place where RAS, parent transforms and voxel indices meet.

Needs only `slicer` (the desktop application or pip's `slicer-core`), vtk, numpy and the engine's light
modules (`weakicl.volume`, `weakicl.prompts`): no Qt and no torch, so it runs under pytest.

Conventions: the engine wants arrays [k, j, i], IJK voxel coordinates and LPS geometry; Slicer gives
RAS. Every node is taken in *world* coordinates (its linear parent transforms applied), so a volume,
its prompts and its segmentation may each sit under a different transform and still line up.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support
from weakicl.errors import InputError
from weakicl.prompts import Box, Point, PromptSet, clip_box
from weakicl.slicebox import DETECT, OrientedBox, check_inside, roi_prompt
from weakicl.volume import SEGMENT_COLOURS, Geometry, Volume

ROLE_ATTRIBUTE = "WeakICLSegment.Role"
VOLUME_REFERENCE_ROLE = "weakICLSegmentVolume"
SLICE_AXIS_ATTRIBUTE = "WeakICLSegment.SliceAxis"  # ROI axis shared by the two placing clicks, or "none"
FIRST_CORNER_ATTRIBUTE = "WeakICLSegment.FirstCorner"  # world RAS of the first click, while placing


class PromptRole(enum.Enum):
    """What a markups node means to the module; stored as a node attribute so scenes keep it."""

    CONTEXT_BOX = "context-box"
    CONTEXT_POSITIVE = "context-positive"
    CONTEXT_NEGATIVE = "context-negative"
    CORRECTION_BOX = "correction-box"
    CORRECTION_POSITIVE = "correction-positive"
    CORRECTION_NEGATIVE = "correction-negative"

    @property
    def is_box(self) -> bool:
        return self.value.endswith("box")

    @property
    def positive(self) -> bool:
        return not self.value.endswith("negative")

    @property
    def is_context(self) -> bool:
        return self.value.startswith("context")

    @property
    def colour(self) -> tuple[float, float, float]:
        """Positive green, negative red, boxes yellow (context) or orange (correction): told apart at a glance."""
        if self.is_box:
            return (1.0, 0.85, 0.1) if self.is_context else (1.0, 0.5, 0.0)
        return (0.2, 0.85, 0.2) if self.positive else (0.95, 0.2, 0.2)

    @property
    def label(self) -> str:
        kind = "box" if self.is_box else ("positive" if self.positive else "negative")
        return f"{'context' if self.is_context else 'correction'} {kind}"


CONTEXT_ROLES = tuple(role for role in PromptRole if role.is_context)
CORRECTION_ROLES = tuple(role for role in PromptRole if not role.is_context)


# --- matrices and images -------------------------------------------------------------------------


def numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def to_world_matrix(node) -> np.ndarray:
    """4x4 from the node's own coordinates to world RAS; a warping transform must be hardened first."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under a non-linear transform: harden it first "
            "(Data module, right-click the transform > Harden transform)"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return numpy_matrix(matrix)


def image_data(array: np.ndarray) -> vtk.vtkImageData:
    """A deep-copied vtkImageData of a [k, j, i] array (VTK stores i fastest, like C order [k, j, i])."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    return image


def _oriented_image(array: np.ndarray, ijk_to_node: np.ndarray):
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(image_data(array))
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_node))
    return image


# --- volumes -------------------------------------------------------------------------------------


def geometry_from_volume_node(node) -> Geometry:
    """World geometry of a volume node: IJK-to-RAS with its parent transforms applied."""
    image = node.GetImageData()
    if image is None:
        raise InputError(f"volume '{node.GetName()}' has no image data")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    return Geometry.from_ijk_to_ras(to_world_matrix(node) @ numpy_matrix(ijk_to_ras), image.GetDimensions()[::-1])


def volume_from_node(node, modality: str = "auto") -> Volume:
    """Engine Volume (a copy of the voxels, so later edits of the node do not reach a running job)."""
    geometry = geometry_from_volume_node(node)
    return Volume(np.array(slicer.util.arrayFromVolume(node), copy=True), geometry, modality)


def volume_on_grid(node, geometry: Geometry) -> np.ndarray:
    """A volume node's voxels resampled (linearly, as the Segment Editor aligns its source volume)
    onto the world grid `geometry`, as a float array (K, J, I); 0 outside the volume."""
    world = geometry_from_volume_node(node)
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(node.GetImageData())
    image.SetImageToWorldMatrix(vtk_matrix(world.ijk_to_ras_matrix()))
    reference = _oriented_image(np.zeros(geometry.shape_kji, dtype=np.uint8), geometry.ijk_to_ras_matrix())
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled, True)
    return numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(geometry.shape_kji).astype(np.float32)


def volume_node_from_volume(scene, volume: Volume, name: str):
    """A new scalar volume node showing an engine Volume (synthetic data, files read by the engine)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(vtk_matrix(volume.geometry.ijk_to_ras_matrix()))
    node.SetAndObserveImageData(image_data(volume.array))
    node.CreateDefaultDisplayNodes()
    return node


# --- prompts -------------------------------------------------------------------------------------


def role_of(node) -> PromptRole | None:
    value = node.GetAttribute(ROLE_ATTRIBUTE)
    return PromptRole(value) if value in {role.value for role in PromptRole} else None


def create_prompt_node(scene, role: PromptRole, volume_node):
    """A markups node for one kind of prompt on one volume: an ROI per box, a point list per sign."""
    class_name = "vtkMRMLMarkupsROINode" if role.is_box else "vtkMRMLMarkupsFiducialNode"
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(f"{volume_node.GetName()} {role.label}"))
    node.SetAttribute(ROLE_ATTRIBUTE, role.value)
    node.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volume_node.GetID())
    if not role.is_box:
        node.SetControlPointLabelFormat("+%d" if role.positive else "-%d")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(role.colour)
    display.SetColor(role.colour)
    display.SetActiveColor(role.colour)
    return node


def prompt_nodes(scene, roles: tuple[PromptRole, ...], volume_node=None) -> list:
    """The module's markups nodes of the given roles (drawn on `volume_node` when given), in scene order."""
    found = []
    nodes = scene.GetNodes()
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if not node.IsA("vtkMRMLMarkupsNode") or role_of(node) not in roles:
            continue
        if volume_node is None or node.GetNodeReferenceID(VOLUME_REFERENCE_ROLE) == volume_node.GetID():
            found.append(node)
    return found


def prompt_volume(node):
    """The volume a prompt node was drawn on (None when that volume was deleted)."""
    return node.GetNodeReference(VOLUME_REFERENCE_ROLE)


def defined_positions(node) -> np.ndarray:
    """World RAS positions (N, 3) of the placed control points (a point being dragged in is skipped)."""
    positions = []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) == node.PositionDefined:
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            positions.append(position)
    return np.array(positions, dtype=float).reshape(-1, 3)


def roi_frame_world(roi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ROI's centre, unit axes (columns) and size in world RAS (mm)."""
    to_world_matrix(roi)  # refuse warping transforms: the ROI's matrix would ignore them
    object_to_world = numpy_matrix(roi.GetObjectToWorldMatrix())
    scales = np.linalg.norm(object_to_world[:3, :3], axis=0)
    return object_to_world[:3, 3].copy(), object_to_world[:3, :3] / scales, np.asarray(roi.GetSize(), dtype=float) * scales


def recorded_slice_axis(roi) -> int | None:
    """The ROI axis its two placing clicks shared (recorded by `watch_box_placement`), None for a box
    placed or set as 3D, `slicebox.DETECT` when nothing was recorded (a loaded scene, a script)."""
    value = roi.GetAttribute(SLICE_AXIS_ATTRIBUTE)
    if value is None:
        return DETECT
    return int(value) if value in ("0", "1", "2") else None


def box_from_roi(roi, geometry: Geometry) -> Box | OrientedBox | None:
    """The ROI as a box prompt in the IJK of `geometry` (see `weakicl.slicebox.roi_prompt`: a box drawn
    on a slice stays a slice box, oblique slices give an oriented box), clipped to the image.

    None while the ROI is not placed yet.
    """
    if roi.GetNumberOfDefinedControlPoints() == 0 or not any(roi.GetSize()):
        return None
    centre, axes, size = roi_frame_world(roi)
    box = roi_prompt(centre, axes, size, geometry.ras_to_ijk, geometry, recorded_slice_axis(roi))
    if isinstance(box, OrientedBox):
        return check_inside(box, geometry, f"box '{roi.GetName()}'")
    clipped = clip_box(box, geometry)
    if clipped is None:
        raise InputError(f"box '{roi.GetName()}' lies outside the image")
    return clipped


def watch_box_placement(roi, slice_node_at_cursor: Callable[[], object],
                        on_placed: Callable[[object], None] = lambda roi: None) -> list[int]:
    """Observe an ROI being placed by two clicks: at the first click, turn the ROI into the frame of the
    slice view clicked in (so Slicer sizes it in that view's plane, oblique views included) and note the
    click; once the second has made it a box, record which ROI axis the two clicks shared
    (`recorded_slice_axis`) and set the ROI's side along it to 0, undoing Slicer's padding: a flat box
    is a slice box by its shape alone (`weakicl.slicebox`'s thin-side rule), also after its sides are
    resized with the handles and in files saved from the scene; then `on_placed(roi)`, once. Returns the
    observer tags.

    The second click is recognised by the ROI's state (one control point where Slicer has replaced the
    two corners, a size, a centre away from the first corner), whichever point event tells of it:
    Slicer's `AddControlPoint` decides whether to invoke PointPositionDefinedEvent by reading the added
    control point after the box update has deleted it, so that event comes or not depending on what the
    freed memory holds (the first full test run of a fresh clone left one box in five unflattened), and
    whoever listens for it to learn that a box is in hears `on_placed` instead."""

    def on_point_event(caller, event) -> None:
        placing = caller.GetNumberOfControlPoints() == 1 and caller.GetNumberOfDefinedControlPoints() == 1
        first = caller.GetAttribute(FIRST_CORNER_ATTRIBUTE)
        if first is None:
            if placing and not any(caller.GetSize()):  # first click: Slicer has not sized the box yet
                position = [0.0, 0.0, 0.0]
                caller.GetNthControlPointPositionWorld(0, position)
                caller.SetAttribute(FIRST_CORNER_ATTRIBUTE, " ".join(repr(float(c)) for c in position))
                slice_node = slice_node_at_cursor()
                if slice_node is not None:
                    orient_roi(caller, numpy_matrix(slice_node.GetSliceToRAS())[:3, :3], np.asarray(position))
            return
        if not placing or not any(caller.GetSize()):  # the first corner alone, or the second not placed yet
            return
        centre, axes, _ = roi_frame_world(caller)
        sides = np.abs(2.0 * (centre - np.array([float(c) for c in first.split()])) @ axes)  # second click - first, along the ROI axes
        if sides.max() <= 1e-6:
            return  # Slicer is still replacing the corners: the ROI's centre has not moved off the first yet
        caller.RemoveAttribute(FIRST_CORNER_ATTRIBUTE)
        shared = [a for a in range(3) if sides[a] <= 1e-6 * sides.max()]
        caller.SetAttribute(SLICE_AXIS_ATTRIBUTE, str(shared[0]) if len(shared) == 1 else "none")
        if len(shared) == 1:  # Slicer has padded the box: flatten it back onto its slice
            size = list(caller.GetSize())
            size[shared[0]] = 0.0
            caller.SetSize(*size)
        on_placed(caller)

    return [roi.AddObserver(event, on_point_event)
            for event in (roi.PointPositionDefinedEvent, roi.PointAddedEvent, roi.PointModifiedEvent)]


def orient_roi(roi, slice_to_ras: np.ndarray, centre_world: np.ndarray) -> None:
    """Give an ROI the axes of a slice view (in-plane x, y and their normal), centred at a world point."""
    x, y = slice_to_ras[:, 0] / np.linalg.norm(slice_to_ras[:, 0]), slice_to_ras[:, 1] / np.linalg.norm(slice_to_ras[:, 1])
    object_to_world = np.eye(4)
    object_to_world[:3, :3] = np.column_stack([x, y, np.cross(x, y)])
    object_to_world[:3, 3] = centre_world
    object_to_node = np.linalg.inv(to_world_matrix(roi)) @ object_to_world
    roi.GetObjectToNodeMatrix().DeepCopy(vtk_matrix(object_to_node))


def set_roi_box(roi, box: Box, geometry: Geometry) -> None:
    """Place an ROI on an IJK box of `geometry`, aligned with its voxel axes (scripted and synthetic
    prompts); recorded as set, not clicked, so only a thin side makes it a slice box."""
    ijk_to_ras = geometry.ijk_to_ras_matrix()
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    object_to_node[:3, 3] = geometry.ijk_to_ras((np.asarray(box.lo_ijk) + np.asarray(box.hi_ijk)) / 2)[0]
    object_to_node = np.linalg.inv(to_world_matrix(roi)) @ object_to_node
    size = (np.asarray(box.hi_ijk) - np.asarray(box.lo_ijk)) * np.asarray(geometry.spacing)
    place_roi(roi, object_to_node, size)
    roi.SetAttribute(SLICE_AXIS_ATTRIBUTE, "none")


def place_roi(roi, object_to_node: np.ndarray, size) -> None:
    roi.GetObjectToNodeMatrix().DeepCopy(vtk_matrix(object_to_node))
    roi.SetCenter(object_to_node[:3, 3])
    roi.SetSize(*size)


def prompts_from_nodes(nodes: list, geometry: Geometry) -> PromptSet:
    """Engine prompts, in the IJK of `geometry`, from the module's markups nodes (their roles say the kind)."""
    prompts = PromptSet()
    for node in nodes:
        role = role_of(node)
        if role.is_box:
            box = box_from_roi(node, geometry)
            if box is not None:
                (prompts.oriented_boxes if isinstance(box, OrientedBox) else prompts.boxes).append(box)
        else:
            ijk = geometry.ras_to_ijk(defined_positions(node))
            prompts.points.extend(Point(tuple(position), positive=role.positive) for position in ijk)
    return prompts.validate(geometry, require_prompts=False)


# --- segments ------------------------------------------------------------------------------------


def register_segmentation_converters() -> None:
    """Slicer registers these at start-up; pip's slicer-core does not, and segments need them."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule_class.__name__ not in present:
            factory.RegisterConverterRule(rule_class())


def _labelmap_name() -> str:
    """Slicer's name of the representation segments are written in ("Binary labelmap")."""
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _set_reference_geometry(segmentation, image) -> None:
    """The grid Slicer converts other representations onto (and the Segment Editor paints on)."""
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        slicer.vtkSegmentationConverter.SerializeImageGeometry(image))


def _on_segmentation_lattice(segmentation, labelmap):
    """`labelmap` resampled (nearest neighbour) onto the voxel lattice of the segmentation's reference
    geometry, over the voxels whose centres lie in `labelmap`'s image; `labelmap` itself when it is on
    that lattice already. Slicer resamples a shared labelmap layer onto the lattice of what is written
    into it, so writing on the segmentation's own lattice, as the Segment Editor's effects do, leaves
    the other segments of the layer exactly as they are (an oversampled segmentation, one made on
    another series)."""
    serialized = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    lattice = slicer.vtkOrientedImageData()
    if not serialized or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, lattice, False):
        return labelmap
    image_to_node, lattice_to_node = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_node)
    lattice.GetImageToWorldMatrix(lattice_to_node)
    extent = np.array(labelmap.GetExtent()).reshape(3, 2)  # IJK first and last voxel
    corners = np.array([[a, b, c, 1.0] for a in extent[0] + (-0.5, 0.5) for b in extent[1] + (-0.5, 0.5)
                        for c in extent[2] + (-0.5, 0.5)])
    corners_ijk = (np.linalg.inv(numpy_matrix(lattice_to_node)) @ numpy_matrix(image_to_node) @ corners.T)[:3].T
    lo, hi = np.ceil(corners_ijk.min(axis=0) - 1e-6).astype(int), np.floor(corners_ijk.max(axis=0) + 1e-6).astype(int)
    lattice.SetExtent(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, lattice) and lattice.GetExtent() == labelmap.GetExtent():
        return labelmap
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, lattice, resampled)
    return resampled


def make_labelmap_the_source(segmentation_node, fallback_geometry) -> None:
    """Make the binary labelmap the segmentation's source representation, as the Segment Editor does
    before its first edit: segments are written as labelmaps, and Slicer refuses to write them into a
    segmentation kept as closed surfaces (RTSTRUCT, imported models). Its segments are converted on the
    reference geometry (`fallback_geometry`, a vtkOrientedImageData, when it has none); a closed surface
    it had is kept, now made from the labelmaps. Raises InputError when the conversion fails, with the
    segmentation's segments unchanged."""
    segmentation = segmentation_node.GetSegmentation()
    # 5.4+ call it the source representation; 5.0-5.3 the master representation
    source = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if source() == _labelmap_name():
        return
    closed_surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    had_closed_surface = segmentation.ContainsRepresentation(closed_surface)
    if not segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()):
        _set_reference_geometry(segmentation, fallback_geometry)
    if segmentation.GetNumberOfSegments() and not segmentation.CreateRepresentation(_labelmap_name()):
        raise InputError(f"'{segmentation_node.GetName()}' has no binary labelmap and Slicer could not make one: "
                         "convert it in the Segmentations module (Representations), then try again")
    (getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName)(_labelmap_name())
    if had_closed_surface:
        segmentation.CreateRepresentation(closed_surface)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetPreferredDisplayRepresentationName2D(_labelmap_name())


def unique_segment_name(segmentation, name: str) -> str:
    """`name`, or `name 2`, `name 3`, ... : a new segment never shadows an existing one."""
    taken = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name} {number}"
    return candidate


def write_segment(segmentation_node, mask: np.ndarray, geometry: Geometry, name: str, segment_id: str = "") -> str:
    """Write a (K, J, I) mask into a segment and return its ID.

    Without `segment_id`, or with one that does not exist yet, a new segment with a unique name is
    added; with an existing one, only that segment's voxels are replaced. Other segments are never
    changed: the mask is written on the segmentation's own voxel lattice (`_on_segmentation_lattice`),
    and where segments overlap, Slicer keeps them on separate labelmap layers. A segmentation node made by a node selector's
    "Create new" has no display node yet: it gets one, so the segment shows. A segmentation kept as
    closed surfaces is converted to binary labelmaps first (`make_labelmap_the_source`).
    """
    register_segmentation_converters()
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    ijk_to_node = np.linalg.inv(to_world_matrix(segmentation_node)) @ geometry.ijk_to_ras_matrix()
    labelmap = _oriented_image(np.asarray(mask, dtype=bool).astype(np.uint8), ijk_to_node)
    if segmentation.GetNumberOfSegments() == 0:  # an empty segmentation takes the target's grid
        _set_reference_geometry(segmentation, labelmap)
    make_labelmap_the_source(segmentation_node, labelmap)
    labelmap = _on_segmentation_lattice(segmentation, labelmap)
    added = not segment_id or segmentation.GetSegment(segment_id) is None
    if added:
        colour = SEGMENT_COLOURS[segmentation.GetNumberOfSegments() % len(SEGMENT_COLOURS)]
        segment_id = segmentation.AddEmptySegment(segment_id, unique_segment_name(segmentation, name), colour)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    written = logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE)
    if not written:
        if added:  # no empty stray segment left behind
            segmentation.RemoveSegment(segment_id)
        raise RuntimeError(f"Slicer refused to write segment '{name}'")
    return segment_id


def write_segment_block(segmentation_node, block: np.ndarray, geometry: Geometry, region: tuple, segment_id: str) -> bool:
    """Set an existing segment to `block` inside `region` (slices k, j, i of `geometry`; `block` is that
    block, K, J, I), leaving its voxels outside the region and every other segment as they were, at a
    cost that scales with the region rather than the volume. Returns False, having written nothing,
    where only `write_segment` can write it: no such segment, a segmentation not kept as binary
    labelmaps, or a segmentation or segment layer on another voxel lattice than `geometry`'s (the
    block would have to be resampled, spilling over the region's border)."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    # 5.4+ call it the source representation; 5.0-5.3 the master representation
    source = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if segment is None or source() != _labelmap_name():
        return False
    (k0, k1, _), (j0, j1, _), (i0, i1, _) = (part.indices(n) for part, n in zip(region, geometry.shape_kji))
    if k1 <= k0 or j1 <= j0 or i1 <= i0:
        return True
    ijk_to_node = np.linalg.inv(to_world_matrix(segmentation_node)) @ geometry.ijk_to_ras_matrix()
    extent = (i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)  # the region's voxels in the IJK of `geometry`

    def modifier(value: int):
        labelmap = _oriented_image(np.asarray(block, dtype=bool).astype(np.min_scalar_type(value)) * value, ijk_to_node)
        labelmap.SetExtent(*extent)
        return labelmap

    labelmap = modifier(1)
    layer = segment.GetRepresentation(_labelmap_name())
    if (layer is None or _on_segmentation_lattice(segmentation, labelmap) is not labelmap
            or not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, layer)):
        return False
    register_segmentation_converters()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # MODE_REPLACE clears the whole segment first when it shares its labelmap layer. A minimum removes the
    # segment where the block is 0 (moving it to a layer of its own where the block would cover another
    # segment), then a maximum adds it where the block is 1: Slicer takes the larger voxel value there,
    # so the block carries the segment's label value in its layer (read after the minimum, which may
    # have moved it)
    for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
        if mode == logic.MODE_MERGE_MAX:
            labelmap = modifier(segment.GetLabelValue())
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode, extent):
            raise RuntimeError(f"Slicer refused to write segment '{segment.GetName()}'")
    return True


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def read_segment(segmentation_node, segment_id: str, geometry: Geometry, region: Optional[tuple] = None) -> np.ndarray:
    """A segment resampled (nearest neighbour) onto `geometry`, as a bool array (K, J, I); with `region`
    (slices k, j, i of `geometry`) only that block of it, and only that much work where the segment's
    labelmap layer is on `geometry`'s lattice. A segment kept only as a closed surface is converted for
    this read; the segmentation is left as it is."""
    (k0, k1, _), (j0, j1, _), (i0, i1, _) = (part.indices(n) for part, n in zip(region or (slice(None),) * 3, geometry.shape_kji))
    reference = slicer.vtkOrientedImageData()  # the geometry only: nothing allocated
    reference.SetImageToWorldMatrix(vtk_matrix(np.linalg.inv(to_world_matrix(segmentation_node)) @ geometry.ijk_to_ras_matrix()))
    reference.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    labelmap = slicer.vtkOrientedImageData()
    if segmentation.ContainsRepresentation(_labelmap_name()):
        layer = segment.GetRepresentation(_labelmap_name()) if segment is not None else None
        if layer is not None and slicer.vtkOrientedImageDataResample.DoGeometriesMatch(layer, reference):
            return _label_block(layer, segment.GetLabelValue(), np.array([k0, j0, i0]), np.array([k1, j1, i1]))
        read = segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    else:  # converts a copy of this one segment, in the segmentation node's coordinates
        read = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, labelmap, False)
    if not read:
        raise InputError(f"segment '{segment.GetName() if segment else segment_id}' of '{segmentation_node.GetName()}' "
                         "cannot be read as a binary labelmap: convert it in the Segmentations module")
    shape = (k1 - k0, j1 - j0, i1 - i0)
    if labelmap.IsEmpty():
        return np.zeros(shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    return numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) > 0


def _label_block(layer, label_value: int, lo_kji: np.ndarray, hi_kji: np.ndarray) -> np.ndarray:
    """Where a labelmap layer holds `label_value` in the block [lo, hi) KJI of its own lattice, False
    outside its extent: what Slicer's threshold of the layer resampled onto that block gives, read in
    place from the layer's voxels inside the block only."""
    block = np.zeros(hi_kji - lo_kji, dtype=bool)
    first, last = np.array(layer.GetExtent()).reshape(3, 2)[::-1].T  # KJI of the layer's first and last voxel
    lo, hi = np.maximum(lo_kji, first), np.minimum(hi_kji, last + 1)
    if np.all(hi > lo):
        voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(last - first + 1)
        block[tuple(slice(a, b) for a, b in zip(lo - lo_kji, hi - lo_kji))] = (
            voxels[tuple(slice(a, b) for a, b in zip(lo - first, hi - first))] == label_value)
    return block
