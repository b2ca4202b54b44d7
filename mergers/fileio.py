"""Positional file I/O and console text that behave the same on Linux, macOS and Windows.

Model files are read at offsets by several threads at once (the reader thread, the
hasher that rides on its reads, the verifier) and the writer patches its header at
offset 0 at the end. POSIX offers ``pread``/``preadv``/``pwrite`` for this: they leave
the shared file position alone. Windows' Python has none of them, nor ``posix_fadvise``
or ``mmap.madvise``, and ``os.open`` there opens in *text* mode unless told otherwise
(a read stops at the first 0x1A byte, so a good model looks cut short).

Where the positional calls are missing, each call seeks and reads (or writes) under one
lock per descriptor: the same bytes, only serialised per file. That path is plain Python,
so the tests force it on Linux too (``use_positional_calls(False)``).

Example:
    >>> fd = open_for_reading("model.safetensors")
    >>> header_length = pread(fd, 8, 0)
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator

BINARY = getattr(os, "O_BINARY", 0)  # Windows: no CRLF or 0x1A translation
NO_INHERIT = getattr(os, "O_NOINHERIT", 0)  # Windows: child processes don't hold our model files open

_native = hasattr(os, "preadv") and hasattr(os, "pwrite")
_locks: dict[int, threading.Lock] = {}
_readers: dict[int, io.FileIO] = {}
_locks_lock = threading.Lock()


def open_for_reading(path: str | os.PathLike) -> int:
    """A descriptor for reading ``path`` as bytes, on every OS."""
    return os.open(path, os.O_RDONLY | BINARY | NO_INHERIT)


def positional_calls_native() -> bool:
    """True where the OS's own ``preadv``/``pwrite`` serve (Linux, BSD); False on Windows."""
    return _native


@contextlib.contextmanager
def use_positional_calls(native: bool) -> Iterator[None]:
    """Force the native calls off (or on, where they exist) while the block runs; for tests."""
    global _native
    saved = _native
    _native = native and hasattr(os, "preadv") and hasattr(os, "pwrite")
    try:
        yield
    finally:
        _native = saved


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` into ``view``; the count read (0 at the end of file)."""
    if _native:
        return os.preadv(fd, [view], offset)
    lock, file = _reader_for(fd)
    with lock:
        file.seek(offset)
        return file.readinto(view) or 0


def pread(fd: int, count: int, offset: int) -> bytes:
    """``count`` bytes at ``offset``, fewer only where the file ends first."""
    buffer = bytearray(count)
    view, done = memoryview(buffer), 0
    while done < count:
        got = pread_into(fd, view[done:], offset + done)
        if got == 0:
            break
        done += got
    view.release()
    del buffer[done:]
    return bytes(buffer)


def pwrite(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``, leaving the descriptor's position where it was."""
    view = memoryview(data).cast("B")
    if _native:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        return
    with _lock_for(fd):
        position = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.lseek(fd, position, os.SEEK_SET)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable where the OS can (POSIX); Windows has no directory fsync."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse it; the rename itself has happened
    finally:
        os.close(fd)


def ensure_utf8_console() -> None:
    """Let the CLI print "≈", "α", "−" whatever the console's code page.

    Windows encodes a redirected stdout/stderr in the ANSI code page (cp1252), which
    has none of these: printing them raises UnicodeEncodeError. Such streams are
    switched to UTF-8; a stream that can already encode them is left alone.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None or not hasattr(stream, "reconfigure"):
            continue
        try:
            "≈α−".encode(stream.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(encoding="utf-8", errors="replace")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. On Windows ``os.kill(pid, 0)`` would *terminate* it
    (signal 0 is an exit code there), so the process is asked for its exit code instead."""
    if os.name == "nt":
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: it exists
    try:
        code = wintypes.DWORD()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _lock_for(fd: int) -> threading.Lock:
    lock = _locks.get(fd)
    if lock is None:
        with _locks_lock:
            lock = _locks.setdefault(fd, threading.Lock())
    return lock


def _reader_for(fd: int) -> tuple[threading.Lock, io.FileIO]:
    """The lock of descriptor ``fd`` and an unbuffered reader on it, made once: a new ``FileIO`` per
    read cost more than the read itself under Wine (0.85 s vs 0.25 s for an SD1.5 file's 1,130 tensors).
    Descriptor numbers are reused after a close; the reader only names the number, so it reads
    whatever file holds it now."""
    reader = _readers.get(fd)
    if reader is None:
        with _locks_lock:
            reader = _readers.setdefault(fd, io.FileIO(fd, "rb", closefd=False))
    return _lock_for(fd), reader
