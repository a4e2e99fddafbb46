"""The package as users get it (issue 13): a wheel that carries the weights, their card and licence;
the weights lookup; devices with a CPU fallback; provenance in every output; progress and -v/-q.

The full check (fresh venv, `pip install` of the wheel, `weakicl demo`) is `scripts/check_wheel.sh`;
here the wheel is built from a copy of the needed files (a few seconds, no network, nothing written
into the checkout).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from weakicl import weights as weights_module
from weakicl.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")


def _setuptools_supports_licence_expressions() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not _setuptools_supports_licence_expressions():
        pytest.skip("building offline needs setuptools >= 77 installed")
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_FILES:
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "WeakICLSegment" / "weakicl", source / "WeakICLSegment" / "weakicl",
                    ignore=shutil.ignore_patterns("__pycache__", "_weights"))
    (source / "model_weights").mkdir()
    for path in (ROOT / "model_weights").iterdir():
        if path.is_file():
            shutil.copy(path, source / "model_weights" / path.name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
                   check=True, capture_output=True, cwd=source)
    (built,) = dist.glob("weakicl-*.whl")
    return built


def test_the_wheel_carries_weights_card_licences_and_type_marker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = weights_module.SHIPPED_NAME
    for name in (shipped, shipped.replace(".safetensors", ".json"), "LICENSE.md", "README.md"):
        assert f"weakicl/{weights_module.PACKAGED_FOLDER}/{name}" in names
    assert "weakicl/py.typed" in names
    assert not any("checkpoint" in name for name in names)  # the training checkpoint stays in the repository
    info = next(name for name in names if name.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    assert "License-Expression: Apache-2.0 AND CC-BY-SA-4.0" in metadata and "Requires-Python: >=3.9" in metadata
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert any(name.endswith("licenses/model_weights/LICENSE.md") for name in names)


def test_the_packaged_weights_match_the_repository_copy(wheel):
    with zipfile.ZipFile(wheel) as archive:
        card = json.loads(archive.read(f"weakicl/_weights/{weights_module.SHIPPED_NAME.replace('.safetensors', '.json')}"))
    assert card["sha256"] == weights_module.sha256_of(ROOT / "model_weights" / weights_module.SHIPPED_NAME)


def test_weights_are_looked_up_in_the_installed_package_first(tmp_path, monkeypatch):
    monkeypatch.delenv(weights_module.WEIGHTS_ENV, raising=False)
    package = tmp_path / "site" / "weakicl"
    monkeypatch.setattr(weights_module, "__file__", str(package / "weights.py"))
    checkout = tmp_path / "model_weights"  # package.parent.parent: the checkout layout
    checkout.mkdir()
    (checkout / weights_module.SHIPPED_NAME).write_bytes(b"checkout")
    assert weights_module.default_weights_path() == checkout / weights_module.SHIPPED_NAME
    (package / "_weights").mkdir(parents=True)
    (package / "_weights" / weights_module.SHIPPED_NAME).write_bytes(b"wheel")
    assert weights_module.default_weights_path() == package / "_weights" / weights_module.SHIPPED_NAME
    monkeypatch.setenv(weights_module.WEIGHTS_ENV, str(tmp_path / "mine.safetensors"))
    assert weights_module.default_weights_path() == tmp_path / "mine.safetensors"


# -- devices -----------------------------------------------------------------------------------------
def test_devices_resolve_with_a_cpu_fallback_and_a_message(weakicl_log):
    import torch

    from weakicl.devices import mps_available, resolve_device

    logger = logging.getLogger("weakicl")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert resolve_device("cpu") == "cpu"
        assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
        missing = [device for device, present in (("cuda", torch.cuda.is_available()), ("mps", mps_available())) if not present]
        for device in missing:
            weakicl_log.clear()
            assert resolve_device(device) == "cpu"
            assert f"device '{device}' asked for" in weakicl_log[0] and "running on the CPU" in weakicl_log[0]
    finally:
        logger.setLevel(level)
    with pytest.raises(InputError, match="device must be one of"):
        resolve_device("tpu")


def test_the_command_line_offers_mps_and_verbosity_on_every_command():
    from weakicl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--device", "mps", "-q"])
    assert (args.device, args.quiet, args.verbose) == ("mps", True, 0)
    args = parser.parse_args(["-v", "segment", "ct.nii.gz", "--prompts", "p.json", "--output", "o.nii.gz"])
    assert (args.verbose, args.quiet) == (1, False)
    assert "negative" in parser._subparsers._group_actions[0].choices["segment"].format_help()


def test_verbosity_sets_the_weakicl_logger():
    from weakicl.cli import configure_logging

    logger = logging.getLogger("weakicl")
    saved = logger.handlers[:], logger.propagate, logger.level
    try:
        for verbose, quiet, level in ((0, False, logging.INFO), (1, False, logging.DEBUG), (0, True, logging.WARNING)):
            configure_logging(verbose, quiet)
            assert logger.level == level
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


def test_progress_draws_one_line_per_phase(monkeypatch):
    import tqdm

    try:
        from weakicl.cli_common import progress_bar
    except ImportError:
        from weakicl.cli import progress_bar

    bars = []

    class Recorder:
        def __init__(self, **options) -> None:
            self.desc, self.n, self.closed = options["desc"], 0, False
            bars.append(self)

        def set_postfix_str(self, text, refresh=True) -> None:
            pass

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    update = progress_bar("weakicl")
    for fraction, message in ((0.0, "encoding context 1/2"), (0.5, "encoding context 2/2"), (1.0, "context encoded"),
                              (0.0, "aligning context 1/1 to the target"), (0.1, "segmenting window 1/10"),
                              (1.0, "segmenting window 10/10")):
        update(fraction, message)
    assert [bar.desc for bar in bars] == ["weakicl: encoding context", "weakicl: aligning context to the target",
                                          "weakicl: segmenting window"]
    assert bars[0].n == 100 and bars[0].closed and bars[-1].n == 100


# -- provenance --------------------------------------------------------------------------------------
def _record():
    from weakicl.prompts import Box, PromptSet
    from weakicl.provenance import provenance

    card = {"name": "net", "version": "0.1.0", "file": "w.safetensors", "sha256": "ab" * 32}
    return provenance(card, Path("/", "scans", "ct.nii.gz"), PromptSet([Box((1, 1, 1), (2, 2, 2))]),
                      Path("/", "scans", "boxes.mrk.json"), [(Path("/", "r", "ref.nii.gz"), "ref_label.nii.gz")], ["liver"])


def test_provenance_records_weights_prompts_and_version_with_file_names_only():
    from weakicl import __version__

    record = _record()
    assert record["tool"] == {"name": "weakicl", "version": __version__}
    assert record["weights"]["sha256"] == "ab" * 32 and record["weights"]["version"] == "0.1.0"
    assert record["target"] == "ct.nii.gz" and record["prompts"]["file"] == "boxes.mrk.json"
    assert record["prompts"]["boxes"] == [{"min": [1.0, 1.0, 1.0], "max": [2.0, 2.0, 2.0]}]
    assert record["context"] == [{"image": "ref.nii.gz", "annotation": "ref_label.nii.gz"}]
    assert "/scans" not in json.dumps(record)


@pytest.mark.parametrize("name, in_header", [("out.seg.nrrd", True), ("out.nrrd", True), ("out.nii.gz", False), ("out.nii", False)])
def test_every_mask_output_carries_its_provenance(tmp_path, name, in_header):
    import SimpleITK as sitk

    from weakicl.provenance import HEADER_KEY, sidecar_path
    from weakicl.volume import Geometry, write_mask

    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[1:3, 1:4, 2:5] = True
    record = _record()
    path = write_mask(tmp_path / name, mask, Geometry.identity(mask.shape), ["liver"], provenance=record)
    if in_header:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        assert json.loads(reader.GetMetaData(HEADER_KEY)) == record
        assert not sidecar_path(path).exists()
    else:
        assert sidecar_path(path) == tmp_path / f"{name}.provenance.json"
        assert json.loads(sidecar_path(path).read_text()) == record


def test_recorded_paths_and_commands_are_portable(tmp_path, monkeypatch):
    from weakicl.provenance import portable_command, portable_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert portable_path(tmp_path / "shared" / "manifest.json") == "../shared/manifest.json"
    assert portable_path(tmp_path / "repo" / "model_weights" / "w.safetensors") == "model_weights/w.safetensors"
    assert portable_path(Path("/", "far", "away", "deep", "w.safetensors")) == "w.safetensors"
    assert portable_path("relative/x.json") == "relative/x.json"
    program = str(Path("/", "opt", "python", "bin", "weakicl"))
    assert portable_command([program, "evaluate", f"--out={tmp_path / 'repo' / 'out'}", "--seed", "0"]) == "weakicl evaluate --out=out --seed 0"


# -- reports -----------------------------------------------------------------------------------------
def test_a_shipped_report_is_rebuilt_from_its_results_with_a_summary_legends_and_no_single_structure_intervals(tmp_path):
    from PIL import Image

    from weakicl.evaluation.report import rewrite_report

    folder = tmp_path / "engine-0.3"
    (folder / "figures").mkdir(parents=True)
    shutil.copy(ROOT / "reports" / "engine-0.3" / "results.json", folder / "results.json")
    report = rewrite_report(folder).read_text()
    assert report.index("## Summary") < report.index("## How this was run") < report.index("### validation")
    assert "growcut is better" in report and "not a medical device" in report
    single = [line for line in report.splitlines() if line.startswith("| model | brain_stem | 1 |")]
    assert single and "[" not in single[0]
    assert report.count("*Bars:") == len(list((folder / "figures").glob("dice-*.png")))
    widths = [Image.open(path).size[0] for path in (folder / "figures").glob("*.png")]
    assert widths and max(widths) <= 1000
