"""Training pipeline of the WS-ICL network (see docs/TRAINING.md).

`synthetic` (procedural tasks), `episodes` (in-context episodes and prompt simulation), `data` (the
real-data cache) and `loop` (`weakicl train`). Nothing here is needed for inference.
"""
