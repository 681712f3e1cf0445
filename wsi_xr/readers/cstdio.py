"""What C libraries print while wsi_xr calls them: captured, logged, and used as evidence.

cuCIM's C++ code reports problems by printing, not by raising: ``[Warning] Loading image
(...) with a slow-path`` on stderr when it opens a stripped TIFF, and ``ERROR in line 205
while decompressing JPEG image: Corrupt JPEG data ...`` on stdout when libjpeg-turbo finds
damaged entropy-coded data in a tile, whose pixels it then returns wrong, without an
exception. A library must not print, and a damaged tile must never be served, so every
cuCIM call of wsi_xr runs inside :func:`c_output`:

- C's ``stdout`` and ``stderr`` streams (the ``FILE *`` globals of the C library, which
  ``printf`` and ``fprintf(stderr, ...)`` write to) point to two unlinked temporary files
  (opened once, kept open) for as long as any wsi_xr call is inside the block. Python's own ``sys.stdout``/``sys.stderr``
  (file descriptors 1 and 2) are left alone, so prints, progress bars and logging of the
  caller and of other threads are unaffected. The streams are put back when the last call
  leaves.
- Each call gets the text printed while it ran (with several threads in cuCIM at once, a
  call may also see another call's text: a suspicion, which the caller resolves by
  decoding again alone, see :func:`c_output` ``exclusive``).
- Every captured text is logged once to the ``wsi_xr.thirdparty`` logger at INFO (shown by
  ``wsi-xr -v``).

This works with glibc, where ``stdout``/``stderr`` are variables a program may assign.
Elsewhere (no such symbols), nothing is captured and cuCIM prints as it does.

Some C++ code prints past those variables (``std::cout`` keeps its own handle on the original
stream): with a CUDA build of torch imported first (it loads ``libcufile``), cuCIM's first
import and its first ``CuImage`` try to start cuFile (GPUDirect Storage) and, with no GPU
driver, print ``dlopen error libcuda.so.1 ... cuFile initialization failed`` partly that way.
Such once-per-process start-up work runs inside :func:`fd_output_captured`, which points
file descriptors 1 and 2 themselves at temporary files for that moment and logs what was
written there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("wsi_xr.thirdparty")

__all__ = ["Captured", "c_output", "decoder_error", "fd_output_captured"]


@dataclass
class Captured:
    """The C-level text printed while one call ran (filled in when its block ends).

    ``alone`` is True when no other wsi_xr call was inside :func:`c_output` at any moment
    of this one: then the text is this call's own.
    """

    stdout: str = ""
    stderr: str = ""
    alone: bool = True

    @property
    def text(self) -> str:
        return (self.stdout + self.stderr).strip()


#: Quoted text (a file path in a message) is not evidence: a slide in ``failed_scans/`` is not a failure.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: Lines cuFile prints at start-up without a GPU driver (its own and its loader's). cuFile
#: starts in a thread of its own, so they can land inside any capture, a read's included.
_CUFILE_NOISE = re.compile(r"cuFile|cufio|libcuda\.so|cuda symbols|dlopen error", re.IGNORECASE)
#: Words of a decoder reporting bad data (libjpeg-turbo, libtiff, cuCIM's own errors).
_FAILURE = re.compile(r"\b(error|corrupt|premature|invalid|bogus|not enough data|failed|unsupported)\b", re.IGNORECASE)


def decoder_error(text: str) -> bool:
    """Whether captured decoder output reports a failure.

    Each line is judged with its quoted parts (paths) removed; cuCIM's notices (lines
    starting ``[Warning]`` or ``[Info]``, e.g. the slow-path warning for stripped TIFFs)
    are not failures, nor are cuFile's start-up messages ("cuFile initialization failed",
    "dlopen error libcuda.so.1 ...": no GPU driver), which its own thread may print during
    any read.
    """
    for line in text.splitlines():
        if _CUFILE_NOISE.search(line):  # cuFile starting (in a thread of its own) without a GPU driver
            continue
        line = _QUOTED.sub("", line).strip()
        if line and not line.startswith(("[Warning]", "[Info]")) and _FAILURE.search(line):
            return True
    return False


class _SharedExclusive:
    """Many shared holders, or one exclusive holder (a writer-preferring readers-writer lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class _Streams:
    """The process's C ``stdout``/``stderr`` streams, pointed at temporary files while in use.

    The two temporary files (unlinked: nothing is left on disk) are opened on first use and
    stay open for the life of the process: another thread may have read the stream pointer
    just before it is put back, and must never write to a closed stream.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.available = False
        try:
            self.libc = ctypes.CDLL(None)
            self.globals = [ctypes.c_void_p.in_dll(self.libc, name) for name in ("stdout", "stderr")]
            self.libc.tmpfile.restype = ctypes.c_void_p
            self.libc.fflush.argtypes = [ctypes.c_void_p]
            self.libc.fileno.argtypes = [ctypes.c_void_p]
            self.libc.fclose.argtypes = [ctypes.c_void_p]
            self.available = True
        except (OSError, ValueError, AttributeError):  # not glibc: nothing to capture with
            pass
        self.saved: list[int | None] = [None, None]
        self.files: list[int] = []
        self.logged = [0, 0]  # how much of each file has been logged
        self.entries = 0  # calls that have entered so far: a call is alone if none entered during it

    def _open_files(self) -> bool:
        if self.files:
            return True
        handles = [self.libc.tmpfile() for _ in range(2)]
        if not all(handles):
            for handle in handles:
                if handle:
                    self.libc.fclose(handle)
            return False
        self.files = handles
        return True

    def _flush(self) -> list[int]:
        """Flush the temporary files; their sizes."""
        sizes = []
        for handle in self.files:
            self.libc.fflush(handle)
            sizes.append(os.fstat(self.libc.fileno(handle)).st_size)
        return sizes

    def _read(self, index: int, start: int, stop: int) -> str:
        if stop <= start:
            return ""
        data = os.pread(self.libc.fileno(self.files[index]), stop - start, start)
        return data.decode("utf-8", "replace")

    def enter(self) -> tuple[list[int], int, bool] | None:
        """Start capturing for one call: (file sizes at its start, entries so far, whether it is alone
        now), or None when nothing can be captured (no temporary file)."""
        with self.lock:
            if self.users == 0:
                if not self._open_files():
                    return None
                for variable in self.globals:
                    self.libc.fflush(variable.value)  # what was printed before goes where it was going
                self.saved = [variable.value for variable in self.globals]
                for variable, handle in zip(self.globals, self.files):
                    variable.value = handle
            self.users += 1
            self.entries += 1
            return self._flush(), self.entries, self.users == 1

    def leave(self, token: tuple[list[int], int, bool], captured: Captured) -> None:
        start, entries, alone = token
        with self.lock:
            captured.alone = alone and self.entries == entries and self.users == 1
            stop = self._flush()
            captured.stdout, captured.stderr = (self._read(i, start[i], stop[i]) for i in range(2))
            for i in range(2):  # log each piece of text once, whichever call saw it
                for line in self._read(i, self.logged[i], stop[i]).splitlines():
                    if line.strip():
                        log.info("cucim: %s", line.strip())
                self.logged[i] = stop[i]
            self.users -= 1
            if self.users == 0:
                for variable, old in zip(self.globals, self.saved):
                    variable.value = old


_streams = _Streams()
_access = _SharedExclusive()


@contextlib.contextmanager
def c_output(*, exclusive: bool = False) -> Iterator[Captured]:
    """Capture what C code prints during the block (see the module docstring).

    ``exclusive=True`` waits until no other wsi_xr call is inside such a block and keeps
    them out until it ends: the text captured is then this block's alone (used to find
    which tile a decoder complained about). The returned :class:`Captured` is filled in
    when the block ends.
    """
    captured = Captured()
    with _access.hold(exclusive):
        if not _streams.available:
            yield captured
            return
        token = _streams.enter()
        if token is None:
            yield captured
            return
        try:
            yield captured
        finally:
            _streams.leave(token, captured)


def _flush_everything() -> None:
    """Flush Python's and C's output streams (all of C's, ``std::cout``'s buffer included)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    if _streams.available:
        _streams.libc.fflush(None)


@contextlib.contextmanager
def fd_output_captured() -> Iterator[Captured]:
    """Point file descriptors 1 and 2 at temporary files during the block; sort out what was written.

    For short, once-per-process start-up work of C++ libraries that print past the C
    ``stdout``/``stderr`` variables (``std::cout`` keeps its own handle on the original
    stream; see the module docstring). Lines that are cuFile's start-up noise go to the
    ``wsi_xr.thirdparty`` log at INFO; every other line written to the two descriptors in
    the block (another thread's output, say) is written back to its descriptor when the
    block ends, so nothing is lost. The descriptors are put back also on an exception.
    Where a descriptor cannot be duplicated (closed stdout), nothing is captured. The
    returned :class:`Captured` holds all the text once the block has ended.
    """
    captured = Captured()
    _flush_everything()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # a closed descriptor: nothing to protect, nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            yield captured
        finally:
            try:
                _flush_everything()
            finally:
                for fd, old in ((1, saved[0]), (2, saved[1])):
                    os.dup2(old, fd)
                    os.close(old)
            for fd, sink in ((1, out), (2, err)):
                sink.seek(0)
                text = sink.read().decode("utf-8", "replace")
                setattr(captured, "stdout" if fd == 1 else "stderr", text)
                passed_on = []
                for line in text.splitlines(keepends=True):
                    if _CUFILE_NOISE.search(line):
                        log.info("cucim: %s", line.strip())
                    elif line.strip():
                        passed_on.append(line)
                if passed_on:
                    with contextlib.suppress(OSError):
                        os.write(fd, "".join(passed_on).encode("utf-8", "replace"))
