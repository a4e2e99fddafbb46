"""Never lose or corrupt a result (issue 12): write failures, concurrent runs, file modes, leftovers.

Defect 1: a full disk or a file-size limit gave exit 0 and a truncated file, and destroyed the old one
with --overwrite. Defect 2: a file appearing at the output path during a run was replaced. Defect 3:
outputs had mode 0600. Defect 6: temporary files of killed runs stayed forever.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import ellipsoid
from weakicl.atomic import _HOST, TEMPORARY_PREFIX, atomic_path, atomic_paths, remove_stale_temporaries
from weakicl.errors import OutputExists, WriteError
from weakicl.simulation import slice_boxes
from weakicl.volume import Geometry, Volume, check_complete, read_label_map, write_mask, write_volume

GEOMETRY = Geometry((1.0, 1.2, 2.0), (1.0, 2.0, 3.0), np.eye(3), (12, 24, 20))


@pytest.fixture()
def case(tmp_path, tiny_weights):
    truth = ellipsoid(GEOMETRY.shape_kji, (6, 12, 10), (4, 6, 5))
    image = write_volume(tmp_path / "image.nii.gz", Volume((100.0 * truth).astype(np.float32), GEOMETRY))
    prompts = tmp_path / "boxes.json"
    prompts.write_text(json.dumps(slice_boxes(truth).to_voxel_json()))
    return {"image": str(image), "prompts": str(prompts), "dir": tmp_path, "weights": str(tiny_weights), "truth": truth}


def segment_command(case, output, *extra):
    return [sys.executable, "-m", "weakicl.cli", "segment", case["image"], "--prompts", case["prompts"], "--output", str(output),
            "--device", "cpu", "--weights", case["weights"], "-q", *extra]


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(TEMPORARY_PREFIX)]


@contextmanager
def file_size_limit(size):
    """RLIMIT_FSIZE for this process (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)


def test_file_size_limit_exits_3_with_one_line_and_keeps_the_old_output(case):
    """Defect 1, end to end: the command under a file-size limit, replacing an earlier good result."""
    output = case["dir"] / "result.nii"  # uncompressed: 352 + 5760 bytes, past the 4 kB limit
    good = write_mask(output, case["truth"], GEOMETRY, ["old"])
    before = good.read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    result = subprocess.run(segment_command(case, output, "--overwrite"), capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert len(lines) == 1 and lines[0].startswith("weakicl: error: cannot write") and "wrote" not in result.stdout
    assert output.read_bytes() == before
    assert leftovers(case["dir"]) == []


def test_a_provenance_sidecar_is_part_of_its_output(case, capsys):
    """Audit D2: an existing NAME.provenance.json was replaced without --overwrite, and x.nii and x.nii.gz
    shared one, so the older output kept a record of the newer one's prompts."""
    from weakicl.cli import main

    def segment(output, prompts, *extra):
        return main(["segment", case["image"], "--prompts", prompts, "--output", str(output), "--device", "cpu",
                     "--weights", case["weights"], "-q", *extra])

    folder = case["dir"]
    sidecar = folder / "side.nii.gz.provenance.json"
    sidecar.write_text('{"mine": "precious notes"}')
    assert segment(folder / "side.nii.gz", case["prompts"]) == 2
    assert capsys.readouterr().err.strip() == f"weakicl: error: {sidecar} (the provenance of side.nii.gz) exists; pass --overwrite to replace it"
    assert sidecar.read_text() == '{"mine": "precious notes"}' and not (folder / "side.nii.gz").exists()
    assert segment(folder / "side.nii.gz", case["prompts"], "--overwrite") == 0
    assert json.loads(sidecar.read_text())["prompts"]["file"] == "boxes.json"

    other_prompts = folder / "other.json"
    other_prompts.write_text(Path(case["prompts"]).read_text())
    assert segment(folder / "base.nii.gz", case["prompts"]) == 0
    assert segment(folder / "base.nii", str(other_prompts)) == 0
    assert json.loads((folder / "base.nii.gz.provenance.json").read_text())["prompts"]["file"] == "boxes.json"
    assert json.loads((folder / "base.nii.provenance.json").read_text())["prompts"]["file"] == "other.json"
    assert not (folder / "base.provenance.json").exists() and leftovers(folder) == []


def test_an_output_is_not_left_behind_when_its_sidecar_cannot_be_written(case, monkeypatch, capsys):
    """Audit D3: with its sidecar path a folder, exit 3 left the new image without its record, and a rerun
    then refused it as existing. A folder is now refused before any work; one that turns up between that
    check and the write (here: the check skipped) takes the image back with it."""
    import weakicl.volume
    from weakicl.cli import main

    folder = case["dir"]
    (folder / "side.nii.gz.provenance.json").mkdir()
    arguments = ["segment", case["image"], "--prompts", case["prompts"], "--output", str(folder / "side.nii.gz"),
                 "--device", "cpu", "--weights", case["weights"], "-q"]
    assert main(arguments) == 2
    assert "side.nii.gz.provenance.json, where the provenance of side.nii.gz goes, is a folder" in capsys.readouterr().err
    assert not (folder / "side.nii.gz").exists()

    monkeypatch.setattr(weakicl.volume, "check_output_path", lambda path, overwrite=True: Path(path))
    with pytest.raises(WriteError, match="cannot write .*side.nii.gz.provenance.json"):
        write_mask(folder / "side.nii.gz", case["truth"], GEOMETRY, ["x"], provenance={"tool": "test"})
    assert not (folder / "side.nii.gz").exists() and leftovers(folder) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_written_together_are_published_together_or_not_at_all(tmp_path, overwrite):
    """When the second file cannot be published, the first is taken back: removed when it is new,
    restored byte for byte when it replaced an earlier file."""
    first, second = tmp_path / "first.json", tmp_path / "second.nii"
    if overwrite:
        first.write_bytes(b"earlier record")
    second.mkdir()  # cannot be replaced by a file, nor linked over
    (second / "keep").write_bytes(b"")
    with pytest.raises((WriteError, OutputExists), match="second.nii"):
        with atomic_paths([(first, ".json", None), (second, ".nii", None)], overwrite) as temporaries:
            for temporary in temporaries:
                temporary.write_bytes(b"new")
    assert (first.read_bytes() == b"earlier record") if overwrite else not first.exists()
    assert second.is_dir() and leftovers(tmp_path) == []
    with atomic_paths([(first, ".json", None), (tmp_path / "third.nii", ".nii", None)], True) as temporaries:
        for temporary, text in zip(temporaries, (b"record", b"image")):
            temporary.write_bytes(text)
    assert first.read_bytes() == b"record" and (tmp_path / "third.nii").read_bytes() == b"image" and leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix, limit", [(".nii.gz", 64), (".nii", 1024), (".nrrd", 200), (".seg.nrrd", 200)])
def test_every_format_refuses_a_truncated_write(tmp_path, suffix, limit):
    """A truncated .nii.gz or .nii reads back without error in ITK (missing voxels become zeros): the
    write path must find out by itself and leave the earlier file as it was."""
    masks = np.zeros((1,) + GEOMETRY.shape_kji, bool)
    masks[0, 2:10, 3:20, 4:15] = np.random.default_rng(0).random((8, 17, 11)) > 0.5  # noise does not compress away
    output = tmp_path / f"out{suffix}"
    output.write_bytes(b"earlier result")
    with file_size_limit(limit), pytest.raises(WriteError, match="cannot write"):
        write_mask(output, masks, GEOMETRY, ["x"])
    assert output.read_bytes() == b"earlier result" and leftovers(tmp_path) == []


def test_truncated_files_fail_the_completeness_check(tmp_path):
    masks = np.zeros(GEOMETRY.shape_kji, bool)
    masks[2:8, 3:9, 4:8] = True
    for suffix in (".nii.gz", ".nii"):
        path = write_mask(tmp_path / f"m{suffix}", masks, GEOMETRY, ["x"])
        check_complete(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 8])
        with pytest.raises((EOFError, ValueError)):
            check_complete(path)


@pytest.mark.parametrize("number, reason", [(errno.ENOSPC, "disk or quota is full"), (errno.EDQUOT, "disk or quota is full"),
                                            (errno.EFBIG, "file-size limit"), (errno.EACCES, "permission denied")])
def test_os_errors_while_writing_become_write_errors(tmp_path, number, reason):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError, match=reason):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(number, os.strerror(number))
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path):
    """Defect 2 in one process: the exists check is repeated by an exclusive create at publish time."""
    target = tmp_path / "out.bin"
    with pytest.raises(OutputExists, match="appeared while"):
        with atomic_path(target, overwrite=False) as temporary:
            temporary.write_bytes(b"mine")
            target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs" and leftovers(tmp_path) == []
    with atomic_path(target, overwrite=True) as temporary:
        temporary.write_bytes(b"mine")
    assert target.read_bytes() == b"mine"


RACE = """
import os, sys, time
from pathlib import Path
import weakicl.atomic as atomic

barrier, publish = Path(sys.argv[1]), atomic._publish

def wait_for_both(temporary, path, overwrite):  # both runs passed the start-up check and computed
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.02)
    publish(temporary, path, overwrite)

atomic._publish = wait_for_both
from weakicl.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_concurrent_runs_to_one_new_path_one_wins_the_other_exits_2(case):
    """Defect 2 with two processes: both report success and one result is silently lost, before."""
    barrier = case["dir"] / "barrier"
    barrier.mkdir()
    output = case["dir"] / "shared.nii.gz"
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(barrier)] + segment_command(case, output)[3:],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "appeared while this run was writing" in loser
    assert read_label_map(output, GEOMETRY).any() and leftovers(case["dir"]) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_the_umask(tmp_path, umask):
    """Defect 3: outputs were 0600 whatever the umask."""
    previous = os.umask(umask)
    try:
        path = write_mask(tmp_path / "out.seg.nrrd", np.ones(GEOMETRY.shape_kji, bool), GEOMETRY, ["x"])
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_write(tmp_path):
    """Defect 6: a run killed while writing left a hidden .weakicl-* file for ever."""
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom weakicl.atomic import atomic_path\n"
                               "with atomic_path(sys.argv[1], '.nii.gz') as t:\n    t.write_bytes(b'half'); print('ready', flush=True); time.sleep(60)",
                               str(tmp_path / "out.nii.gz")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()
    writer.wait()
    assert len(leftovers(tmp_path)) == 1
    old = tmp_path / f"{TEMPORARY_PREFIX}abcd1234.nrrd"  # older naming, no process id: removed by age
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    mine = tmp_path / f"{TEMPORARY_PREFIX}{os.getpid()}-{_HOST}-live.nii"  # a live process's: kept
    mine.write_bytes(b"x")
    write_mask(tmp_path / "next.nii.gz", np.ones(GEOMETRY.shape_kji, bool), GEOMETRY, ["x"])
    assert leftovers(tmp_path) == [mine.name]
    assert remove_stale_temporaries(tmp_path) == []
