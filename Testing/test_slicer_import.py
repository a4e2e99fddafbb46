"""WeakICLSegment.py loads where Slicer would refuse to start a module that fails: with pip's
slicer-core (no Qt, no application) and without torch (installed later from the Device section)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")

MODULE_DIR = Path(__file__).resolve().parent.parent / "WeakICLSegment"


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=MODULE_DIR)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_module_imports_without_the_application():
    output = run_python(
        "import slicer, WeakICLSegment as m\n"
        "assert m.WeakICLSegmentWidget and m.WeakICLSegmentTest\n"
        "print(m.WeakICLSegmentLogic(slicer.vtkMRMLScene()).contextEntries())"
    )
    assert output == "[]"


def test_module_imports_without_torch_and_says_it_is_missing():
    output = run_python(
        "import sys\n"
        "sys.modules['torch'] = None  # as if PyTorch were not installed: importing it would fail\n"
        "import slicer, WeakICLSegment as m\n"
        "print(m.WeakICLSegmentLogic(slicer.vtkMRMLScene()).missingPackages())"
    )
    assert output == "['torch']"
