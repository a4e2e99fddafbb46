"""Helpers of the WeakICLSegment Slicer module that run without Qt or torch, so they can be unit-tested."""
