"""No shipped file records an absolute path of the machine that made it (issue 13).

Reports, model cards and docs travel with the repository and the wheel; a path such as the build
machine's home or scratch folder is useless anywhere else and tells strangers about that machine.
Writers record paths relative to the working folder (`weakicl.provenance.portable_path`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 5 << 20  # larger files are data, not text
# a path from a machine's root (Linux scratch/home/work folders, macOS and Windows home folders),
# not a part of a URL or of a longer relative path
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|home|tmp|root|Users|mnt/data)/[\w.-]|\b[A-Za-z]:\\+Users\\")


def repository_text_files() -> list[Path]:
    """Tracked files plus new files not ignored (they are about to be committed), text only."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:
            files.append(path)
    return files


def absolute_paths(text: str) -> list[str]:
    """Each offending line, shortened, with its line number."""
    return [f"{number}: {line.strip()[:160]}" for number, line in enumerate(text.splitlines(), 1) if ABSOLUTE_PATH.search(line)]


# the offending examples are assembled, so that this file does not hold them literally
@pytest.mark.parametrize("text, found", [
    (f"manifest: /{'work'}/shared/data/manifest.json", True),
    (f"python at /{'root'}/.pyenv/versions/3.11.7/bin/weakicl", True),
    (f"C:{chr(92)}Users{chr(92)}me{chr(92)}scan.nii.gz", True),
    ("see ../shared/data/manifest.json and https://example.org/home/page", False),
    ("model_weights/weakicl-0.1.safetensors, ~/data/ct.nii.gz", False),
])
def test_the_pattern_finds_machine_paths_only(text, found):
    assert bool(absolute_paths(text)) is found


def test_no_tracked_text_file_holds_an_absolute_machine_path():
    offenders = {}
    for path in repository_text_files():
        lines = absolute_paths(path.read_text(errors="replace"))
        if lines:
            offenders[str(path.relative_to(ROOT))] = lines[:3]
    assert not offenders, "absolute machine paths (record paths relative to the repository):\n" + "\n".join(
        f"{name}: {lines}" for name, lines in offenders.items())
