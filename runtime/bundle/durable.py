"""Crash- and concurrency-safe file operations for bundles: the directory lock, atomic replaces, fsync.

* :func:`locked_dir` takes an exclusive advisory ``flock`` on the bundle *directory itself* (no lock
  file, so nothing unlisted appears in the bundle). ``flock`` locks belong to an open file
  description, so they exclude other threads of this process as well as other processes.
* :func:`replace_file_atomic` writes a unique hidden temp file (``.manifest.yaml.tmp-<random>``),
  fsyncs it, ``os.replace``-s it over the target and fsyncs the directory: readers see the old or
  the new file whole, and after a power cut the new name points at complete data. On any error the
  temp file is removed. A process killed mid-write can leave a temp file behind: loaders ignore
  names matching :data:`TEMP_PATTERN`, and the next update removes them (under the lock).
* :func:`fault_point` is a deterministic kill point for the fault-injection tests
  (``EDGE_AD_FAULT_KILL=<name>`` SIGKILLs the process there); a no-op otherwise.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .schema import BundleError

#: Environment variable naming the kill point at which :func:`fault_point` SIGKILLs the process (tests only).
FAULT_ENV = "EDGE_AD_FAULT_KILL"
#: Hidden temp files of an interrupted manifest update; never read, ignored by loaders, removed on the next update.
TEMP_PATTERN = re.compile(r"^\.manifest\.yaml\.tmp-[A-Za-z0-9_]+$")
_TEMP_PREFIX = ".manifest.yaml.tmp-"


def fault_point(name: str) -> None:
    """SIGKILL this process when ``EDGE_AD_FAULT_KILL`` equals ``name`` (deterministic crash tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so renames / creations inside it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[int]:
    """Hold an exclusive lock on the directory ``path``; yields its open descriptor.

    The descriptor pins the directory that is locked: if ``path`` was swapped for another directory
    (``write_bundle`` replacing the bundle) while waiting, the lock is retaken on the new one, so the
    caller always holds the lock of the directory the name points at when it gets control.
    """
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(f"{path} is not a bundle directory (it vanished or is a file)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the name now points at another directory: lock that one instead
    try:
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def remove_stale_temps(dir_fd: int) -> None:
    """Delete temp files left by killed updates (call with the directory lock held)."""
    for name in os.listdir(dir_fd):
        if TEMP_PATTERN.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)


def replace_file_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Atomically replace ``name`` in the directory ``dir_fd`` by ``data`` (durable once this returns)."""
    tmp = _TEMP_PREFIX + os.urandom(8).hex()  # unique per call: threads and processes never share one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fault_point("manifest-temp-written")
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point("manifest-temp-synced")
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    fault_point("manifest-replaced")
    os.fsync(dir_fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in_dir(staging: Path, out: Path) -> Path | None:
    """Put the finished directory ``staging`` under the name ``out``; returns where the old ``out`` now is.

    With an existing ``out`` the two names are exchanged atomically where the kernel can (so a crash
    leaves either the old or the new bundle under ``out``, never none); elsewhere ``out`` is renamed
    aside first. The caller removes the returned old directory once this returned.
    """
    if not out.exists():
        fault_point("bundle-before-swap")
        os.rename(staging, out)
        fsync_dir(out.parent)
        return None
    fault_point("bundle-before-swap")
    if _exchange(staging, out):
        fsync_dir(out.parent)
        return staging
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the previous bundle back
        raise
    fsync_dir(out.parent)
    return old
