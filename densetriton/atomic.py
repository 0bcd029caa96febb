"""Writing a file so that a failure never leaves it half-written: a temporary file, then a rename."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _real(path: str | os.PathLike) -> Path:
    """A symbolic link is written through, as open() would: its target is what gets replaced."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or unlink in `folder` durable (a power cut after it keeps it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # a folder that cannot be opened (Windows, some FUSE): nothing more can be done
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync folders; the rename itself still happened
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename into place: a failure never leaves a half-written file.

    The temporary file is `.NAME.XXXXXXXX.tmp` beside the file (`stale_temps` finds those a killed
    run left). It is fsynced before the rename and the folder after it, so that a finished write
    survives a power cut. The file gets the permissions a plain open() would give it (0o666 less
    the umask), or keeps those of the file it replaces -- not mkstemp's owner-only 0o600. A
    symbolic link is written through, as open() would: its target is replaced, the link stays."""
    path = _real(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)
    return path


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """The temporary files atomic_write(path) creates (`.NAME.XXXXXXXX.tmp`) that are there now:
    left by a killed writer, when no live one is writing `path`. Only that exact pattern, for that
    exact name, is matched, so no other file is ever taken for one."""
    path = _real(path)
    # mkstemp's random part: 8 characters of [a-z0-9_].
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[a-z0-9_]{8}\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n) and (path.parent / n).is_file())
