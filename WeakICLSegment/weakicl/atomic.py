"""The one way this tool publishes a file: nobody ever sees a half-written, truncated or clobbered output.

A writer gets a temporary path in the destination folder (same file system), writes it, and on leaving
the block the file is flushed to disk, verified (the caller's `verify` reads it all back), given the
umask's mode, and published: by `os.replace` with `overwrite`, else by an exclusive create (a hard link,
which fails when the name exists), so a file that appeared meanwhile, such as a concurrent run's
output, is never replaced. Any failure leaves the destination as it was and no temporary file behind.
Files that belong together (an image and its provenance sidecar) are published together or not at all.
Temporary files of killed runs (`.weakicl-*`) are removed by the next write into the same folder.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import OutputExists, WriteError

TEMPORARY_PREFIX = ".weakicl-"
STALE_SECONDS = 6 * 3600  # a temporary file this old is a leftover whatever process made it
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", overwrite: bool = True,
                verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; publish it as `path` when the block succeeds.

    `suffix`: the temporary file's ending, for writers that pick the format from the name ("" keeps
    none). `overwrite`: replace an existing `path`; when False an existing file (checked at publish
    time, so one that appeared during the block counts) raises OutputExists. `verify(temporary)`: reads
    the written file back and raises when it is incomplete. The block writes the file by name and may
    leave it closed. Raises WriteError for disk-full, quota, size-limit, permission and other OS errors;
    in every failure `path` is left untouched and the temporary file is removed.
    """
    with atomic_paths([(path, suffix, verify)], overwrite) as (temporary,):
        yield temporary


@contextmanager
def atomic_paths(outputs: Sequence[tuple[str | os.PathLike, str, Callable[[Path], None] | None]],
                 overwrite: bool = True) -> Iterator[list[Path]]:
    """`atomic_path` for files that belong together (an image and its provenance sidecar): yield one
    temporary path per (path, suffix, verify); publish all of them, in this order, or none. When one
    cannot be published, those published before it are taken back (earlier files restored), so every
    path is as it was. The last is the output the user asked for: errors of the block name it."""
    paths = [Path(path) for path, _, _ in outputs]
    for folder in dict.fromkeys(path.parent for path in paths):
        remove_stale_temporaries(folder)
    temporaries = [path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{suffix}"
                   for path, (_, suffix, _) in zip(paths, outputs)]
    backups: list[Path] = []
    try:
        try:
            for temporary in temporaries:
                # 0o666 filtered by the umask, like any new file (mkstemp's 0600 would hide results from the group)
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            yield temporaries
            for temporary in temporaries:
                _sync(temporary)
        except OSError as error:
            raise WriteError(f"cannot write {paths[-1]}: {_reason(error)}") from None
        except RuntimeError as error:  # writers in C++ (ITK) report I/O failures this way
            raise WriteError(f"cannot write {paths[-1]}: {_last_line(error, temporaries[-1])}") from None
        for path, temporary, (_, _, verify) in zip(paths, temporaries, outputs):
            if verify is not None:
                try:
                    verify(temporary)
                except Exception as error:
                    raise WriteError(f"cannot write {path}: the written file does not read back complete "
                                     f"(disk full, quota or file-size limit?): {_last_line(error, temporary)}") from None
        published: list[tuple[Path, Path | None]] = []  # (path, the earlier file kept to restore it, if any)
        for index, (path, temporary) in enumerate(zip(paths, temporaries)):
            try:
                backup = _keep_earlier(path) if overwrite and index < len(paths) - 1 else None
                if backup is not None:
                    backups.append(backup)
                _publish(temporary, path, overwrite)
            except OSError as error:
                _take_back(published)
                if isinstance(error, FileExistsError):
                    raise OutputExists(f"{path} appeared while this run was writing it; pass --overwrite to replace it") from None
                raise WriteError(f"cannot write {path}: {_reason(error)}") from None
            published.append((path, backup))
        for folder in dict.fromkeys(path.parent for path in paths):
            _sync_folder(folder)
    finally:
        for leftover in temporaries + backups:
            try:
                os.unlink(leftover)  # after os.replace it is gone; after os.link the published name remains
            except OSError:
                pass  # gone already, or left for the next write into this folder to remove


def _keep_earlier(path: Path) -> Path | None:
    """A second name for the file at `path` (None when there is none), so it can be put back."""
    if not os.path.lexists(path):
        return None
    backup = path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)  # no hard links on this file system
    return backup


def _take_back(published: Sequence[tuple[Path, Path | None]]) -> None:
    """Undo the publishing of files whose companion failed: restore each earlier file, or remove the new one."""
    for path, backup in reversed(published):
        try:
            if backup is None:
                os.unlink(path)
            else:
                os.replace(backup, path)
        except OSError:
            pass  # best effort: the error that brought us here is reported


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # atomic and exclusive: fails with FileExistsError when `path` exists
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links on this file system: reserve the name exclusively, then move the file onto it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(temporary, path)


def _sync(path: Path) -> None:
    """Flush a written file to the disk before it is published, so a crash cannot publish a hole."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    """Flush the new name to the disk; best effort (some systems, Windows among them, cannot)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _last_line(error: Exception, temporary: Path) -> str:
    """The gist of a writer's or reader's error, naming the temporary file as the user knows it."""
    text = str(error).strip().replace(str(temporary), "the file")
    return text.splitlines()[-1] if text else type(error).__name__


def _reason(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk or quota is full"
    if error.errno == errno.EFBIG:
        return "the file-size limit was reached"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return error.strerror or str(error)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove this tool's temporary files left in `folder` by killed runs; return what was removed.

    A temporary file is stale when the process named in it (this host only) is gone, or when it is
    older than STALE_SECONDS (older naming, other hosts on a shared folder)."""
    removed = []
    try:
        names = [name for name in os.listdir(folder) if name.startswith(TEMPORARY_PREFIX)]
    except OSError:
        return removed
    for name in names:
        candidate = Path(folder) / name
        try:
            age = time.time() - candidate.lstat().st_mtime
            if age > STALE_SECONDS or _owner_is_gone(name):
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue  # removed meanwhile, or not ours to remove
    return removed


def _owner_is_gone(name: str) -> bool:
    parts = name[len(TEMPORARY_PREFIX):].split("-")
    if len(parts) < 3 or parts[1] != _HOST or not parts[0].isdigit():
        return False
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, owned by someone else
    return False
