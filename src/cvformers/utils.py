"""Small helpers shared across the package: atomic file writes, image grids, devices."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from cvformers.errors import UserError


def _umask_mode() -> int:
    # mkstemp creates files 0600; give the final file the mode a plain open() would have.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_target(path: str | Path) -> Path:
    """The file a write to ``path`` replaces: symlinks are followed (written through, not
    replaced), and anything that exists but is not a regular file (a directory, a device such as
    ``/dev/null``, a pipe) is refused, so a write never swaps a special file for a plain one."""
    path = Path(path)
    real = Path(os.path.realpath(path)) if path.is_symlink() else path
    if real.exists() and not real.is_file():
        what = "a directory" if real.is_dir() else "not a regular file"
        raise UserError(f"cannot write {path}: it is {what}; give the path of a file")
    return real


def atomic_save(path: Path, save_fn) -> None:
    """Call ``save_fn(tmp_path)`` then atomically rename the result onto ``path``.

    A reader (or a crash) sees the old file or the new one, never half of one; a symlink at
    ``path`` is written through; an OS failure (no such folder, no permission, disk full) is a
    ``UserError`` naming the path.
    """
    path = write_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        save_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_save(path, write)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr for a loop a user waits for: redrawn in place on a terminal, updated
    every 30 s when stderr is a log file (so that a log shows progress without a line per item)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)
