"""Atomic file writes: write beside the target under a temporary name, then rename over it, so an
interruption never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """Where derived files are kept between runs (converted base LMs, caption features): $SEEDTOK_CACHE, else
    ~/.cache/seedtok."""
    return Path(os.environ.get("SEEDTOK_CACHE") or Path.home() / ".cache" / "seedtok")


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` produces the file; it then replaces ``target`` in one rename."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write(target, lambda p: Path(p).write_text(text))


def atomic_write_folder(target: str | os.PathLike, write: Callable[[Path], object],
                        keep_existing: Callable[[Path], bool] | None = None) -> Path:
    """``write(tmp_folder)`` fills a fresh folder beside ``target``; it then replaces ``target`` whole (the old
    folder is renamed away first, then deleted), so a reader never sees a half-written folder; on error the
    temporary folder is removed. ``keep_existing(target)``, checked after writing: True keeps ``target`` as it
    is (e.g. another process finished the same folder first) and drops the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if keep_existing is not None and keep_existing(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
