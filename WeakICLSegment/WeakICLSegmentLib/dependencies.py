"""Which Python packages the engine needs, and the install commands that never replace a PyTorch
that is already there (a CUDA build chosen for the machine's driver would otherwise be swapped for
whatever PyPI has: `monai` requires `torch`, and pip may upgrade it to satisfy that).

Plain Python (no Qt, no Slicer), so the commands are unit-tested; the Widget runs them in a
`QProcess`, off the GUI thread.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from typing import Optional

# import name -> pip requirement
REQUIRED_PACKAGES = {
    "torch": "torch>=2.2",
    "monai": "monai>=1.3",
    "SimpleITK": "SimpleITK>=2.2",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
}
TORCH_REQUIREMENT = REQUIRED_PACKAGES["torch"]
LIGHT_THE_TORCH = "light-the-torch>=0.5"


def missing_packages() -> list[str]:
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def installed_torch_version() -> Optional[str]:
    """The installed torch's exact version, local label included ("2.4.1+cu121"), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_commands(pytorch_extension: bool) -> list[list[str]]:
    """Python-module command lines (run as `python -m ...`) that install PyTorch.

    With Slicer's PyTorch extension present, the same tool its installer uses (light-the-torch, which
    picks the CUDA or CPU build the driver supports); otherwise plain pip.
    """
    if pytorch_extension:
        return [["pip", "install", LIGHT_THE_TORCH], ["light_the_torch", "install", TORCH_REQUIREMENT]]
    return [["pip", "install", TORCH_REQUIREMENT]]


def other_packages_command(names: list[str], torch_version: Optional[str]) -> Optional[list[str]]:
    """The pip command line for the engine's other packages, with the installed torch pinned to its
    exact version so that resolving `monai` can never replace it. None when nothing is missing."""
    requirements = [REQUIRED_PACKAGES[name] for name in names if name != "torch"]
    if not requirements:
        return None
    pins = [f"torch=={torch_version}"] if torch_version else []
    return ["pip", "install", *requirements, *pins]


def python_launcher() -> str:
    """The Python that runs the install commands (`python -m ...`) in Slicer's environment: the
    `PythonSlicer` launcher that Slicer puts on the PATH, found as `slicer.util` finds it. Inside the
    application `sys.executable` is Slicer itself, so `-m pip` there would start a second Slicer."""
    launcher = shutil.which("PythonSlicer")
    if launcher is None:
        raise RuntimeError("PythonSlicer executable not found on the PATH, so packages cannot be installed from here: "
                           "install them from Slicer's Python console with slicer.util.pip_install")
    return launcher
