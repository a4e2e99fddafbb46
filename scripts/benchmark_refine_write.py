"""Main-thread cost of writing one refine into a Slicer segmentation (`SceneLogic._write`), with real
Slicer core (`pip install slicer-core`): a 512x512x200 CT target, 20 segments, a Segment Editor node
(overwrite all segments), one refine of a 40x40x40 block of the first segment. Not a test: it allocates
several whole-volume arrays and takes about a minute.

    python scripts/benchmark_refine_write.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "WeakICLSegment"), str(REPO / "Testing")]

GEOMETRY_SPACING_IJK, GEOMETRY_ORIGIN, SHAPE_KJI = (0.8, 0.8, 1.5), (-200.0, -200.0, -150.0), (200, 512, 512)
REGION_KJI = (slice(80, 120), slice(120, 160), slice(240, 280))
OTHER_SEGMENTS = 19


def main(argv: list[str] | None = None) -> int:
    import slicer
    from conftest import application_scene, ellipsoid
    from weakicl.volume import Geometry, Volume
    from WeakICLSegmentLib import mrml_bridge as bridge
    from WeakICLSegmentLib.history import ActiveSegment
    from WeakICLSegmentLib.scene_logic import SceneLogic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    geometry = Geometry(GEOMETRY_SPACING_IJK, GEOMETRY_ORIGIN, np.eye(3), SHAPE_KJI)
    liver = ellipsoid(SHAPE_KJI, (100, 256, 256), (40, 120, 120))
    refined = liver.copy()
    refined[90:110, 130:150, 250:270] = True  # the refined block gains a bump
    seconds = []
    for _ in range(args.repeats):
        scene = application_scene()
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        logic = SceneLogic(scene, lambda device: None)
        volume = bridge.volume_node_from_volume(scene, Volume(np.zeros(SHAPE_KJI, np.int16), geometry, "CT"), "CT")
        segmentation = logic.createSegmentation(volume)
        target = logic.engineVolume(volume)
        subject = ActiveSegment(segmentation.GetID(), "liver", volume.GetID(), "liver")
        logic._write(subject, "liver", liver, None, target, newSegment=True)
        for n in range(OTHER_SEGMENTS):
            organ = np.zeros(SHAPE_KJI, bool)
            organ[10 * n + 2:10 * n + 9, 20 + (n % 4) * 120:100 + (n % 4) * 120, 20:100] = True
            bridge.write_segment(segmentation, organ, geometry, f"organ{n}")
        editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetAndObserveSegmentationNode(segmentation)
        started = time.perf_counter()
        logic._write(subject, "liver", refined, REGION_KJI, target, newSegment=False)
        seconds.append(time.perf_counter() - started)
        assert np.array_equal(bridge.read_segment(segmentation, "liver", geometry), refined), "the refine was written as predicted"
    print(f"one refine write, {OTHER_SEGMENTS + 1} segments, 512x512x200: {statistics.median(seconds):.3f} s "
          f"(median of {len(seconds)}: {', '.join(f'{value:.3f}' for value in seconds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
