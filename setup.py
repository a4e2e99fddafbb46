"""Build hook only (the metadata is in pyproject.toml): a wheel must carry the shipped weights.

The weights have one copy in git, `model_weights/`, which the Slicer module and a checkout read
directly; this copies that folder's top-level files (weights, JSON card, model card, weights licence)
into the built package as `weakicl/_weights/`, where `weakicl.weights.default_weights_path` looks
first. Editable installs skip the copy: they read `model_weights/` of the checkout.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEIGHTS_FOLDER = Path(__file__).resolve().parent / "model_weights"
WEIGHTS_PATTERNS = ("*.safetensors", "*.json", "*.md")  # the same files the Slicer extension installs


class BuildPyWithWeights(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = sorted(path for pattern in WEIGHTS_PATTERNS for path in WEIGHTS_FOLDER.glob(pattern))
        if not any(path.suffix == ".safetensors" for path in files):
            raise SystemExit(f"no weights in {WEIGHTS_FOLDER}: a wheel without them cannot run `weakicl demo`")
        target = Path(self.build_lib) / "weakicl" / "_weights"
        self.mkpath(str(target))
        for path in files:
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithWeights})
