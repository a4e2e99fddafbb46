"""WeakICLSegment engine: weakly supervised in-context segmentation of 3D medical images.

Layers, bottom up: `volume` (geometry, I/O), `prompts` (weak prompts, rasterisation), `simulation`
(prompts derived from masks), `preprocess`, `network`, `weights`, `devices`, `session` (encode once,
segment many), `provenance` (what made an output), `cli`. Nothing here imports Slicer.
"""

__version__ = "0.1.0"
