"""Standard I/O of one container process (init or exec): fifos, files, logger binaries, ptys.

containerd hands the shim three strings (``stdin``, ``stdout``, ``stderr``) and a
``terminal`` flag. This module turns them into the fds ``runc`` gives the container
process and copies bytes between those and the client's destinations, with one
daemon thread per stream. Nothing blocks the caller: output fifos are opened for
writing by the copier threads (that open waits for the client's reader, as in
containerd), and the copiers sleep in ``poll`` next to a shared eventfd, so
``close()`` can always stop them. Pipe-to-fifo copies use splice(2), zero copy.

Reaping is not ours: a logger binary is started through an injected ``spawn``
callable and never waited for (the shim's reaper owns every child exit).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import struct
import termios
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Protocol

from ttrpc.protocol import read_buffer

__all__ = ["NoTerminalError", "ProcessIO", "Spawn", "StdioError"]

log = logging.getLogger("containerd_shim")

# The largest single splice: the kernel moves at most a pipe's worth anyway.
_SPLICE_CHUNK = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# read/write fallback buffer when the source is not a pipe (a pty, a regular file).
_DEFAULT_BUFFER = 1 << 16
# Errors that mean "splice cannot do this pair of files": fall back to read/write.
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV})
# Fds handed to a child are moved to at least this number: the spawner dup2s them
# onto 0..5 one after another, and a source fd below 6 could be clobbered first.
_MIN_CHILD_FD = 6
# Longest path that fits in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
_JOIN_TIMEOUT = 5.0


class StdioError(Exception):
    """The process's stdio could not be set up or used."""


class NoTerminalError(StdioError):
    """A terminal operation (resize) on a process that has no terminal."""


class Spawn(Protocol):
    """Start a child process and return its pid; the caller's reaper collects its exit.

    ``stdin``/``stdout``/``stderr`` are our fds to dup2 onto the child's 0/1/2 (None:
    /dev/null); ``pass_fds`` maps child fd numbers to our fds; ``env`` is the child's
    entire environment. Our fds are close-on-exec; the dup2 makes the child's copies
    inheritable. Must not wait for the child.
    """

    def __call__(
        self,
        argv: list[str],
        *,
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
        pass_fds: dict[int, int],
        env: dict[str, str],
    ) -> int: ...


class _SharedFd:
    """An fd used by several owners (copier threads, the ProcessIO); closed by the last."""

    def __init__(self, fd: int, *, can_splice: bool = False, fifo_path: str | None = None) -> None:
        self.fd = fd
        self.can_splice = can_splice
        # Set for a fifo destination: ``fd`` is then an O_PATH handle, and the copier
        # opens the fifo for writing through it (see _Copier._open_fifo).
        self.fifo_path = fifo_path
        self._refs = 1
        self._lock = threading.Lock()

    def acquire(self) -> _SharedFd:
        with self._lock:
            if self._refs <= 0:
                raise StdioError(f"fd {self.fd} already closed")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            os.close(self.fd)


class _Stop(Exception):
    """close() asked the copier to stop."""


class _Copier:
    """Copy one stream from ``src`` to ``dst`` in a daemon thread, until EOF on ``src``.

    Both fds are non-blocking; the thread sleeps in poll() on the fd it needs and on
    the ProcessIO's wake eventfd, so close() interrupts it whatever it is waiting for.
    If ``dst`` fails (reader gone, disk full) an output copier keeps draining ``src``
    into nothing: the process must never block on a full pipe because nobody reads.

    A fifo destination is first opened for writing here, in the thread: that open
    blocks until the client has a reader, exactly like containerd's copier, so output
    waits in the process's pipe (not in a fifo nobody may ever open) until the client
    is there. close() unblocks that open with unblock().
    """

    def __init__(
        self,
        name: str,
        src: _SharedFd,
        dst: _SharedFd,
        wake: _SharedFd,
        stop: threading.Event,
        *,
        src_is_tty: bool = False,
        dst_is_tty: bool = False,
        drain_on_error: bool = True,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        # Take our own references now: the ProcessIO may drop its own right after start.
        self._src = src.acquire()
        self._dst = dst.acquire()
        self._wake = wake.acquire()
        self._stop = stop
        self._src_is_tty = src_is_tty
        self._dst_is_tty = dst_is_tty
        self._drain_on_error = drain_on_error
        self._on_done = on_done
        self._last_byte: int | None = None  # what a tty stdin copier wrote last
        self._dst_fd = -1 if dst.fifo_path is not None else dst.fd
        self._fifo_reader = -1  # our own reader on a fifo destination
        self._opening = False  # blocked in open() of the fifo destination
        self._unblockers: list[int] = []  # readers opened by unblock(), to end that open
        self._open_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        try:
            self.thread.start()
        except BaseException:
            self._finish(eof=False)
            raise

    # -- the loop -----------------------------------------------------------

    def _run(self) -> None:
        eof = False
        try:
            self._copy()
            eof = True
        except _Stop:
            pass
        except Exception:
            log.exception("%s: copy failed", self.name)
        finally:
            self._finish(eof)

    def _finish(self, eof: bool) -> None:
        try:
            if eof and self._dst_is_tty:
                self._send_tty_eof()
        finally:
            if self._dst.fifo_path is not None:
                # Our writer first: once the client's own writers are gone too it reads
                # EOF. Data already in the fifo stays there for it.
                for fd in (self._dst_fd, self._fifo_reader):
                    if fd != -1:
                        os.close(fd)
            for shared in (self._src, self._dst, self._wake):
                try:
                    shared.release()
                except OSError as exc:
                    log.warning("%s: close fd %d: %s", self.name, shared.fd, exc)
            if self._on_done is not None:
                self._on_done()

    def _wait_for(self, fd: int, events: int) -> None:
        """Sleep until ``fd`` is ready for ``events`` (or hung up); raise _Stop on close()."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._wake.fd, select.POLLIN)
        while True:
            ready = poller.poll()
            if any(rfd == self._wake.fd for rfd, _ in ready):
                raise _Stop
            if ready:
                return

    def _fifo_handle(self) -> str:
        # Through our O_PATH fd: the client may have renamed or removed the path.
        return f"/proc/self/fd/{self._dst.fd}"

    def _open_fifo(self) -> None:
        with self._open_lock:
            if self._stop.is_set():
                raise _Stop
            self._opening = True
        try:
            try:
                fd = os.open(self._fifo_handle(), os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # no /proc: fall back to the path
                assert self._dst.fifo_path is not None
                fd = os.open(self._dst.fifo_path, os.O_WRONLY | os.O_CLOEXEC)
        finally:
            with self._open_lock:
                self._opening = False
                unblockers, self._unblockers = self._unblockers, []
            for unblocker in unblockers:
                os.close(unblocker)
        self._dst_fd = fd
        if self._stop.is_set():
            raise _Stop
        _set_nonblocking(fd)
        # Hold a reader of our own, as containerd does: a client that goes away (or
        # containerd restarting) then does not make our writes fail with EPIPE; the
        # output waits in the fifo, and a client that reattaches picks it up.
        try:
            self._fifo_reader = os.open(
                self._fifo_handle(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError as exc:
            log.debug("%s: no reader of our own on the fifo: %s", self.name, exc)

    def unblock(self) -> None:
        """Called by close() after setting the stop flag: end a pending fifo open."""
        with self._open_lock:
            if not self._opening:
                return
            # A reader arriving completes the writer's open; keep it until the thread
            # is past that open (it closes these), in case it has not entered it yet.
            try:
                fd = os.open(self._fifo_handle(), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.warning("%s: cannot interrupt the fifo open: %s", self.name, exc)
                return
            self._unblockers.append(fd)

    def _copy(self) -> None:
        if self._dst.fifo_path is not None:
            self._open_fifo()
        src, dst = self._src.fd, self._dst_fd
        dst_ok = True
        use_splice = self._dst.can_splice and not self._dst_is_tty
        stalls = 0
        while use_splice and dst_ok:
            if self._stop.is_set():
                raise _Stop
            try:
                n = os.splice(src, dst, _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # EAGAIN does not say which side is not ready: wait for the source to
                # have data, then for the destination to have room, then try again.
                self._wait_for(src, select.POLLIN)
                self._wait_for(dst, select.POLLOUT)
                stalls += 1
                if stalls > 100:  # both sides ready yet no progress: let read/write do it
                    use_splice = False
                continue
            except OSError as exc:
                if exc.errno in _NO_SPLICE:
                    use_splice = False  # e.g. a pty that cannot splice_read on this kernel
                elif exc.errno == errno.EIO and self._src_is_tty:
                    return  # pty master: the slave side is closed, i.e. EOF
                else:
                    dst_ok = self._destination_failed(exc)
                continue
            if n == 0:
                return
            stalls = 0
        self._copy_buffered(dst_ok)

    def _copy_buffered(self, dst_ok: bool) -> None:
        src, dst = self._src.fd, self._dst_fd
        size = _DEFAULT_BUFFER
        # Read a whole pipe's worth at once: a write of a full line is then never split
        # between two reads (which matters when two streams share a file).
        with contextlib.suppress(OSError):  # not a pipe
            size = max(size, fcntl.fcntl(src, fcntl.F_GETPIPE_SZ))
        view = read_buffer(size)  # pages faulted in only as output fills them
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                n = os.readv(src, [view])
            except BlockingIOError:
                self._wait_for(src, select.POLLIN)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO and self._src_is_tty:
                    return  # pty master: the slave side is closed, i.e. EOF
                raise
            if n == 0:
                return
            if dst_ok:
                try:
                    self._write_all(dst, view[:n])
                    self._last_byte = view[n - 1]
                except OSError as exc:
                    dst_ok = self._destination_failed(exc)

    def _write_all(self, fd: int, data: memoryview) -> None:
        while data:
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                self._wait_for(fd, select.POLLOUT)
                continue
            data = data[written:]

    def _destination_failed(self, exc: OSError) -> bool:
        """Handle a write error; return whether the destination is still usable (never)."""
        # EPIPE: the reader is gone (the kernel also raises SIGPIPE, which Python
        # ignores); EIO: the pty's other side is gone. Both are normal endings.
        if exc.errno in (errno.EPIPE, errno.EIO):
            log.debug("%s: reader went away, no longer copying", self.name)
        else:
            log.warning("%s: write failed: %s", self.name, exc)
        if not self._drain_on_error:
            raise _Stop
        return False

    def _send_tty_eof(self) -> None:
        """Make the reader of a tty see end-of-file, without hanging the terminal up.

        containerd's shim closes the pty master here, which hangs up the session and
        throws away output still in the pty. We type the VEOF character instead, as a
        user pressing ^D would: in canonical mode one ends an empty line's read with 0
        bytes (EOF), so a partial line first needs one more to push it out; in raw
        mode the byte reaches the program, and interactive shells treat it as EOF.
        """
        master = self._dst_fd
        veof, canonical = b"\x04", True
        try:
            attrs = termios.tcgetattr(master)
            canonical = bool(attrs[3] & termios.ICANON)
            char = attrs[6][termios.VEOF]
            if isinstance(char, int):
                char = bytes([char])
            if char not in (b"", b"\x00"):  # 0 is _POSIX_VDISABLE
                veof = char
        except termios.error:
            pass
        mid_line = self._last_byte is not None and self._last_byte not in b"\n\r"
        count = 2 if canonical and mid_line else 1
        try:
            self._write_all(master, memoryview(veof * count))
        except (OSError, _Stop) as exc:
            log.debug("%s: could not send EOF to the terminal: %r", self.name, exc)


def _move_up(fd: int) -> int:
    """Return ``fd`` renumbered to at least _MIN_CHILD_FD (close-on-exec), closing the old one."""
    if fd >= _MIN_CHILD_FD:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _MIN_CHILD_FD)
    finally:
        os.close(fd)


def _pipe() -> tuple[int, int]:
    """A close-on-exec pipe (os.pipe uses pipe2(O_CLOEXEC)), both ends renumbered high."""
    r, w = os.pipe()
    try:
        r = _move_up(r)
    except BaseException:
        os.close(w)
        raise
    try:
        w = _move_up(w)
    except BaseException:
        os.close(r)
        raise
    return r, w


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _strip_fifo_scheme(path: str) -> str:
    """containerd accepts bare paths; treat an explicit ``fifo://`` the same way."""
    if path.startswith("fifo://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    return path


class ProcessIO:
    """The stdio of one container process: what runc gets, and the copying afterwards.

    Lifecycle::

        io = ProcessIO(container_id, namespace, stdin=..., stdout=..., stderr=...,
                       terminal=..., spawn=spawn, work_dir=bundle)
        runc create/exec with io.child_stdio() as fds 0-2 and
                             --console-socket io.console_socket (terminal only)
        io.started()          # after runc returned OK
        ...                   # io.resize(), io.close_stdin() at any time
        io.wait(timeout)      # after the process exited: all output delivered?
        io.close()            # on Delete, or after a failed create

    ``stdout`` may be a fifo or other existing file path, ``fifo://PATH``,
    ``file:///PATH`` (stdout and stderr appended to one file, created if missing) or
    ``binary:///PATH?key=value&...`` (a logging binary reading fds 3 and 4); ``stdin``
    and ``stderr`` are paths. ``""`` means /dev/null.

    stdin follows containerd: the shim holds its own write end open on the stdin
    fifo, so a client closing its end (detach, reattach) is not EOF. close_stdin()
    (CloseIO) drops that write end; the copier then delivers whatever clients wrote
    and closes the process's stdin once the last client writer is gone. Output fifos
    are opened for writing by the copier threads (waiting for the client's reader, as
    containerd's copier does), plus a reader of our own as containerd keeps one: a
    client (or containerd itself, across a restart) may go away and come back.

    Calls other than close_stdin(), resize() and wait() are expected to be
    serialised by the caller (the process's lock).
    """

    def __init__(
        self,
        container_id: str,
        namespace: str,
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
        spawn: Spawn | None = None,
        work_dir: str | None = None,
        name: str | None = None,
        io_uid: int = -1,
        io_gid: int = -1,
        logger_ready_timeout: float = 10.0,
    ) -> None:
        """Open the destinations, create the pipes (or console socket), start a logger.

        Nothing here waits for a client (fifos are opened later, by the copiers).
        ``name`` labels threads and log lines (default: the container id).
        ``io_uid``/``io_gid`` (-1: unchanged) own the pipe ends the process gets, as
        containerd's IoUID/IoGID do. ``spawn`` is needed for ``binary://`` only,
        ``work_dir`` (where the console socket goes) for a terminal only.
        Raises StdioError (everything opened so far is released).
        """
        self.container_id = container_id
        self.namespace = namespace
        self.terminal = terminal
        self.name = name or container_id
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pending_outputs = 0
        self._started = False
        self._closed = False
        self._stop = threading.Event()
        self._copiers: list[_Copier] = []

        # Resources the ProcessIO itself owns until started() or close().
        self._child: list[int | None] = [None, None, None]  # runc's fds 0, 1, 2
        self._stdin_src: _SharedFd | None = None  # stdin fifo (or file), read end
        self._stdin_hold: int | None = None  # our write end on the stdin fifo
        self._stdin_dst: _SharedFd | None = None  # process stdin pipe, write end
        self._out_src: _SharedFd | None = None  # process stdout pipe, read end
        self._err_src: _SharedFd | None = None
        self._out_dst: _SharedFd | None = None  # client side (may equal _err_dst)
        self._err_dst: _SharedFd | None = None
        self._master: _SharedFd | None = None  # pty master (terminal)
        self._listener: socket.socket | None = None
        self._socket_path: str | None = None
        self._socket_dir: str | None = None  # a private dir we made for the socket
        self._logger_pid: int | None = None
        self._logger_pidfd: int | None = None
        self._wake = _SharedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

        try:
            self._setup(
                stdin, stdout, stderr, spawn, work_dir, io_uid, io_gid, logger_ready_timeout
            )
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                raise StdioError(f"{self.name}: stdio setup failed: {exc}") from exc
            raise

    # -- setup --------------------------------------------------------------

    def _setup(
        self,
        stdin: str,
        stdout: str,
        stderr: str,
        spawn: Spawn | None,
        work_dir: str | None,
        io_uid: int,
        io_gid: int,
        logger_ready_timeout: float,
    ) -> None:
        scheme, target = self._parse_stdout(stdout)
        if stdin:
            self._open_stdin(_strip_fifo_scheme(stdin), io_uid, io_gid)

        if scheme == "binary":
            if spawn is None:
                raise StdioError(f"{self.name}: binary:// logging needs a spawn function")
            self._start_logger(stdout, spawn, logger_ready_timeout)
        elif self.terminal:
            # The pty carries stdout only; stderr is unused with a terminal.
            if target:
                self._out_dst = self._open_destination(target, scheme == "file")
        else:
            # file:// sends both streams to the one file, but (like containerd) only
            # the streams the client asked for: an empty stderr still means /dev/null.
            if scheme == "file":
                paths = {1: target, 2: target if stderr else ""}
            else:
                paths = {1: target, 2: _strip_fifo_scheme(stderr)}
            shared: _SharedFd | None = None
            for index, path in paths.items():
                if not path:
                    continue
                if scheme == "file":
                    # One fd for both streams: O_APPEND writes of whole chunks keep lines
                    # intact, and it is closed only when both copiers have finished.
                    if shared is None:
                        shared = self._open_destination(path, True)
                    else:
                        shared.acquire()
                    dst = shared
                else:
                    dst = self._open_destination(path, False)
                if index == 1:
                    self._out_dst = dst
                else:
                    self._err_dst = dst
                r, w = _pipe()
                self._child[index] = w
                src = _SharedFd(r, can_splice=True)
                if index == 1:
                    self._out_src = src
                else:
                    self._err_src = src
                self._chown(w, io_uid, io_gid)
                _set_nonblocking(r)

        if self.terminal:
            self._listen(work_dir)

    def _parse_stdout(self, stdout: str) -> tuple[str, str]:
        """Return (scheme, path) for the stdout string, as containerd's createIO reads it."""
        if not stdout:
            return "", ""
        parts = urllib.parse.urlsplit(stdout)
        scheme = parts.scheme or "fifo"
        if scheme == "fifo":
            # containerd uses a scheme-less string as the path verbatim.
            return scheme, stdout if not parts.scheme else urllib.parse.unquote(parts.path)
        if scheme == "file":
            path = urllib.parse.unquote(parts.path)
            if not path:
                raise StdioError(f"{self.name}: file:// URI without a path: {stdout!r}")
            return scheme, path
        if scheme == "binary":
            return scheme, urllib.parse.unquote(parts.path)
        raise StdioError(f"{self.name}: unknown STDIO scheme {scheme!r}")

    def _open_stdin(self, path: str, io_uid: int, io_gid: int) -> None:
        # Read end first, non-blocking: that never waits for a writer. Then our own
        # write end, which (with a reader present) does not block either.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._stdin_src = _SharedFd(fd, can_splice=True)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            self._stdin_hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if self.terminal:
            return  # the pty master becomes the destination in started()
        r, w = _pipe()
        self._child[0] = r
        self._stdin_dst = _SharedFd(w, can_splice=True)
        self._chown(r, io_uid, io_gid)
        _set_nonblocking(w)

    def _open_destination(self, path: str, create: bool) -> _SharedFd:
        """Open where a stream goes. Never blocks, whether or not a client reads yet.

        For a fifo this is only an O_PATH handle: the copier thread opens it for
        writing (which waits for the client's reader). Anything else is appended to
        (and created, for file://).
        """
        if create:
            os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            # splice refuses O_APPEND files; O_APPEND is what keeps two streams (and
            # other writers of the same log) from overwriting each other.
            return _SharedFd(fd, can_splice=False)
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
        if stat.S_ISFIFO(os.fstat(handle).st_mode):
            return _SharedFd(handle, can_splice=True, fifo_path=path)
        os.close(handle)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return _SharedFd(fd, can_splice=False)

    @staticmethod
    def _chown(fd: int, uid: int, gid: int) -> None:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)

    def _start_logger(self, uri: str, spawn: Spawn, timeout: float) -> None:
        """Start a ``binary://`` logger the way containerd's NewBinaryIO does.

        The logger gets the stdout pipe's read end as fd 3, stderr's as fd 4 and a
        "ready" pipe's write end as fd 5; its environment is exactly CONTAINER_ID and
        CONTAINER_NAMESPACE; each query parameter becomes ``key value`` (first value).
        We wait until it closes fd 5 (or writes to it, or exits), at most ``timeout``.
        """
        parts = urllib.parse.urlsplit(uri)
        argv = [urllib.parse.unquote(parts.path)]
        for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
            argv += [key, values[0]]

        out_r, out_w = _pipe()
        self._child[1] = out_w
        err_r = ready_r = ready_w = -1
        try:
            err_r, self._child[2] = _pipe()
            ready_r, ready_w = _pipe()
            pid = spawn(
                argv,
                stdin=None,
                stdout=None,
                stderr=None,
                pass_fds={3: out_r, 4: err_r, 5: ready_w},
                env={"CONTAINER_ID": self.container_id, "CONTAINER_NAMESPACE": self.namespace},
            )
            self._logger_pid = pid
            try:
                # A pidfd lets close() signal this logger even after the reaper has
                # collected it and the pid has been reused.
                self._logger_pidfd = os.pidfd_open(pid)
            except OSError as exc:
                log.debug("%s: pidfd_open(%d): %s", self.name, pid, exc)
            # The logger holds its own copies now; ours would keep it from seeing EOF
            # (and the ready pipe from ever reading EOF).
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
            out_r = err_r = ready_w = -1
            poller = select.poll()
            poller.register(ready_r, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                self._signal_logger(signal.SIGKILL)
                raise StdioError(
                    f"{self.name}: logging binary {argv[0]} not ready after {timeout:g}s"
                )
        finally:
            for fd in (out_r, err_r, ready_r, ready_w):
                if fd != -1:
                    os.close(fd)
        if self.terminal:
            # The pty is copied into the logger's stdout pipe; its stderr pipe gets
            # nothing, so close it now and let the logger see EOF there.
            err_w, self._child[2] = self._child[2], None
            if err_w is not None:
                os.close(err_w)
            self._child[1] = None
            _set_nonblocking(out_w)
            self._out_dst = _SharedFd(out_w, can_splice=True)

    def _listen(self, work_dir: str | None) -> None:
        """Listen on a unix socket for runc's ``--console-socket`` connection."""
        token = os.urandom(6).hex()
        path = os.path.join(work_dir, f"console-{token}.sock") if work_dir else ""
        if not path or len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            # Bundle paths with 64-character ids overflow sun_path: use a private
            # directory instead, as containerd does with its temporary console socket.
            base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
            self._socket_dir = os.path.join(base, f"pty-{token}")
            os.mkdir(self._socket_dir, 0o700)
            path = os.path.join(self._socket_dir, "pty.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
        self._listener = listener
        listener.bind(path)
        self._socket_path = path
        # bind() made the node with the umask's mode (the usual 022 already keeps
        # others from connecting: that needs write permission); narrow it to 0600.
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.setblocking(False)

    # -- the caller's API -----------------------------------------------------

    @property
    def console_socket(self) -> str | None:
        """Path for ``runc --console-socket`` (terminal only; None without a terminal)."""
        return self._socket_path

    @property
    def logger_pid(self) -> int | None:
        """Pid of the ``binary://`` logger, if one was started (the reaper reaps it)."""
        return self._logger_pid

    def child_stdio(self) -> tuple[int | None, int | None, int | None]:
        """The fds runc should get as 0, 1 and 2 (None: /dev/null).

        They stay ours (close-on-exec; the spawner's dup2 makes the child's copies
        inheritable) and are closed by started() or close().
        """
        with self._lock:
            if self._started or self._closed:
                raise StdioError(f"{self.name}: child stdio already released")
            return self._child[0], self._child[1], self._child[2]

    def started(self, timeout: float = 30.0) -> None:
        """runc succeeded: drop our copies of the child's ends and start copying.

        With a terminal, first accept runc's connection on the console socket and
        receive the pty master (runc sends it before ``create``/``exec -d`` returns, so
        this does not wait in practice; ``timeout`` bounds a misbehaving runtime).
        """
        with self._lock:
            if self._closed:
                raise StdioError(f"{self.name}: stdio already closed")
            if self._started:
                raise StdioError(f"{self.name}: started() called twice")
            self._started = True
            # Our copies of the process's pipe ends would keep the output pipes from
            # ever reaching EOF (and stdin from ever seeing a reader go away).
            for index, fd in enumerate(self._child):
                if fd is not None:
                    os.close(fd)
                    self._child[index] = None
        if self.terminal:
            master = self._receive_master(timeout)
            with self._lock:
                if self._closed:
                    os.close(master)
                    raise StdioError(f"{self.name}: stdio closed while starting")
                _set_nonblocking(master)
                self._master = _SharedFd(master, can_splice=False)
        self._start_copiers()

    def _receive_master(self, timeout: float) -> int:
        listener = self._listener
        assert listener is not None
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake.fd, select.POLLIN)
        ready = poller.poll(max(0, int(timeout * 1000)))
        if any(fd == self._wake.fd for fd, _ in ready):
            raise StdioError(f"{self.name}: stdio closed while waiting for the console")
        if not ready:
            raise StdioError(f"{self.name}: no console from the runtime after {timeout:g}s")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                _, fds, msg_flags, _ = socket.recv_fds(conn, 4096, 4, socket.MSG_CMSG_CLOEXEC)
            except (TimeoutError, BlockingIOError):
                raise StdioError(f"{self.name}: runtime sent no console master") from None
        if len(fds) != 1 or msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise StdioError(f"{self.name}: expected one console fd, received {len(fds)}")
        if not os.isatty(fds[0]):
            os.close(fds[0])
            raise StdioError(f"{self.name}: the console fd received is not a terminal")
        self._close_listener()
        return fds[0]

    def _start_copiers(self) -> None:
        with self._lock:
            plan: list[tuple[str, _SharedFd, _SharedFd, dict[str, bool]]] = []
            outputs = 0
            if self._master is not None:
                if self._out_dst is not None:
                    plan.append(("stdout", self._master, self._out_dst, {"src_is_tty": True}))
                    outputs += 1
                if self._stdin_src is not None:
                    plan.append(
                        (
                            "stdin",
                            self._stdin_src,
                            self._master,
                            {"dst_is_tty": True, "drain_on_error": False},
                        )
                    )
            else:
                if self._out_src is not None and self._out_dst is not None:
                    plan.append(("stdout", self._out_src, self._out_dst, {}))
                    outputs += 1
                if self._err_src is not None and self._err_dst is not None:
                    plan.append(("stderr", self._err_src, self._err_dst, {}))
                    outputs += 1
                if self._stdin_src is not None and self._stdin_dst is not None:
                    plan.append(
                        ("stdin", self._stdin_src, self._stdin_dst, {"drain_on_error": False})
                    )
            self._pending_outputs += outputs
            for stream, src, dst, options in plan:
                done = self._output_done if stream != "stdin" else None
                copier = _Copier(
                    f"io-{self.name}-{stream}",
                    src,
                    dst,
                    self._wake,
                    self._stop,
                    on_done=done,
                    **options,
                )
                self._copiers.append(copier)
            # The copiers hold their own references now; drop ours so each fd is closed
            # as soon as its copier is done (that close is the EOF the client waits for).
            # The master stays referenced for resize().
            self._release_streams()
            copiers = list(self._copiers)
        for copier in copiers:
            copier.start()

    def _output_done(self) -> None:
        with self._done:
            self._pending_outputs -= 1
            self._done.notify_all()

    def resize(self, width: int, height: int) -> None:
        """Set the terminal size (TIOCSWINSZ on the pty master); NoTerminalError without one."""
        with self._lock:
            if self._master is None:
                raise NoTerminalError(f"{self.name}: process has no terminal")
            try:
                size = struct.pack("HHHH", height, width, 0, 0)
            except struct.error:
                raise StdioError(f"{self.name}: bad terminal size {width}x{height}") from None
            fcntl.ioctl(self._master.fd, termios.TIOCSWINSZ, size)

    def close_stdin(self) -> None:
        """CloseIO: end the process's stdin once clients' pending input is delivered.

        Drops the shim's own write end of the stdin fifo (containerd's CloseIO does
        exactly this). When the clients have closed theirs too, the copier reads EOF
        and closes the process's stdin pipe; with a terminal it types VEOF (^D)
        instead of hanging up the pty. Idempotent; a no-op without stdin.
        """
        with self._lock:
            fd, self._stdin_hold = self._stdin_hold, None
        if fd is not None:
            os.close(fd)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until all output has been copied: True once each output copier has seen
        EOF from the process and closed its destination (the client then sees EOF).

        Call after the process exited; False on timeout (e.g. a background child still
        holds the output open). True at once if there is nothing to copy.
        """
        with self._done:
            return self._done.wait_for(lambda: self._pending_outputs <= 0, timeout)

    def close(self) -> None:
        """Stop copying and release every fd, socket and thread we have. Idempotent.

        A logger binary gets SIGTERM, as containerd's shim sends it on Delete (its
        pipes are closed first, so a well-behaved logger has already seen EOF).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            copiers = list(self._copiers)
        self._stop.set()
        os.eventfd_write(self._wake.fd, 1)  # stays readable: wakes every poll, forever
        for copier in copiers:
            copier.unblock()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        current = threading.current_thread()
        for copier in copiers:
            if copier.thread is not current and copier.thread.ident is not None:
                copier.thread.join(max(0.0, deadline - time.monotonic()))
                if copier.thread.is_alive():
                    log.warning("%s: copier did not stop; its fds close when it does", copier.name)
        with self._lock:
            for index, fd in enumerate(self._child):
                if fd is not None:
                    os.close(fd)
                    self._child[index] = None
            if self._stdin_hold is not None:
                os.close(self._stdin_hold)
                self._stdin_hold = None
            self._release_streams()
            if self._master is not None:
                self._master.release()
                self._master = None
        self._close_listener()
        if self._logger_pidfd is not None:
            self._signal_logger(signal.SIGTERM)
            os.close(self._logger_pidfd)
            self._logger_pidfd = None
        self._wake.release()

    def __enter__(self) -> ProcessIO:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------

    def _release_streams(self) -> None:
        """Drop the ProcessIO's references on the stream fds (caller holds the lock)."""
        for attr in ("_stdin_src", "_stdin_dst", "_out_src", "_err_src", "_out_dst", "_err_dst"):
            shared: _SharedFd | None = getattr(self, attr)
            setattr(self, attr, None)
            # file:// stores one object in both _out_dst and _err_dst with two references.
            if shared is not None:
                shared.release()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        path, self._socket_path = self._socket_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        directory, self._socket_dir = self._socket_dir, None
        if directory is not None:
            try:
                os.rmdir(directory)
            except OSError as exc:
                log.debug("%s: rmdir %s: %s", self.name, directory, exc)

    def _signal_logger(self, signum: int) -> None:
        if self._logger_pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._logger_pidfd, signum)
        except ProcessLookupError:
            pass  # already gone
        except OSError as exc:
            log.debug("%s: signal logger: %s", self.name, exc)
