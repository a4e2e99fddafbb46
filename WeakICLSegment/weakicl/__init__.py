"""WeakICLSegment engine: weakly supervised in-context segmentation of 3D medical images.

Layers, bottom up: `errors`, `atomic` (the one write path), `volume` (geometry, I/O; `dicom` and
`segfiles` for DICOM and Slicer files), `prompts` and `slicebox` (weak prompts, rasterisation),
`simulation` (prompts derived from masks), `preprocess`, `framing` (prompt-centred, scale-normalised
frames), `network`, `weights`, `devices`, `registration`, `session` (encode once, segment many),
`context` (context files to a task), `provenance` (what made an output), `batch`, `cli_common` and `cli`.
Nothing here imports Slicer.
"""

__version__ = "0.1.0"
