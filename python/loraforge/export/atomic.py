"""Writing export results all-or-nothing: temporary names next to the target, renamed at the end.

A merged checkpoint or a GGUF file is written under a hidden temporary name in the same folder
as its target (so the final rename stays on one filesystem and is atomic), and only renamed into
place once everything succeeded. Any failure, an exception or Ctrl-C, removes the temporary and
leaves what was there before untouched. Existing results are never replaced unless the caller
passes overwrite=True, and the free disk space is checked before a large write so a full disk is
reported up front rather than as a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "ensure_free_space", "refuse_existing_directory", "refuse_existing_file"]

# Headroom on top of the estimate: file-system metadata, GGUF padding, safetensors headers, and
# whatever else gets written to the disk while we work.
_SPACE_MARGIN_FRACTION = 0.02
_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


def _temporary_sibling(target: Path, kind: str) -> Path:
    # Hidden, unique, and in the target's folder: same filesystem, so os.replace is atomic.
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def refuse_existing_file(path: str | os.PathLike, overwrite: bool) -> None:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; the export wants to write a file there")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")


def refuse_existing_directory(path: str | os.PathLike, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace its contents")


def ensure_free_space(directory: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise OSError (ENOSPC) when `directory`'s filesystem has less room than `needed_bytes` plus a margin."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():  # the target folder may not exist yet: ask its nearest existing parent
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(needed_bytes * (1 + _SPACE_MARGIN_FRACTION)) + _SPACE_MARGIN_BYTES
    if free < needed:
        raise OSError(
            28,  # ENOSPC
            f"not enough disk space for {what}: it needs about {needed / 2**30:.2f} GiB in {directory} "
            f"but only {free / 2**30:.2f} GiB is free. Free some space or choose another save_directory.",
        )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on failure deleted."""
    path = Path(path)
    refuse_existing_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path, "partial")
    try:
        yield temporary
        # Checked again: another process may have created the file while we were writing.
        refuse_existing_file(path, overwrite)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False):
    """Yield an empty temporary folder next to `path`; on success it becomes `path`.

    With overwrite=True an existing `path` is moved aside first and deleted only after the new
    folder is in place, so a failure at any point leaves either the old or the new result.
    """
    path = Path(path)
    refuse_existing_directory(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path, "partial")
    temporary.mkdir()
    try:
        yield temporary
        refuse_existing_directory(path, overwrite)
        if path.exists():
            retired = _temporary_sibling(path, "old")
            os.replace(path, retired)
            os.replace(temporary, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
