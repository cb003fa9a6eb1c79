"""The shim daemon: serves the Task API on the listener inherited as fd 3 until shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from containerd_shim.flags import Flags

if TYPE_CHECKING:
    import ttrpc.blocking
    from containerd_shim.process import Stdio
    from containerd_shim.reaper import Reaper
    from containerd_shim.stdio import ProcessIO

log = logging.getLogger("containerd_shim")

RUNTIME = "io.containerd.pyrunc.v2"
PR_SET_CHILD_SUBREAPER = 36


class ContainerdLogHandler(logging.Handler):
    """Writes records in containerd's (logrus) text format to an fd, never blocking.

    The fd is the bundle's ``log`` fifo, which containerd drains; when it does
    not (containerd is down), lines are dropped instead of stalling the shim.
    """

    def __init__(self, fd: int, fields: dict[str, str]) -> None:
        super().__init__()
        self.fd = fd
        self.fields = "".join(f" {k}={_quote(v)}" for k, v in sorted(fields.items()))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            nanos = int((record.created % 1) * 1e9)
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            level = {"WARNING": "warning", "CRITICAL": "fatal"}.get(
                record.levelname, record.levelname.lower()
            )
            line = f'time="{stamp}.{nanos:09d}Z" level={level} msg={_quote(message)}{self.fields}\n'
            os.write(self.fd, line.encode(errors="replace"))
        except (BlockingIOError, BrokenPipeError):
            pass
        except Exception:
            self.handleError(record)


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _setup_logging(flags: Flags) -> None:
    try:
        # containerd created the fifo and reads it; write side non-blocking (see handler).
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 2)  # anything printed to stderr (a crash) reaches containerd's log too
    os.close(fd)
    handler = ContainerdLogHandler(
        2, {"runtime": RUNTIME, "namespace": flags.namespace, "id": flags.id}
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)


def set_subreaper() -> None:
    """Become the parent of orphaned descendants (the container processes runc leaves)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class StopRequest:
    """SIGTERM, SIGINT or :meth:`stop` (from any thread), waited for on the main thread.

    Create it on the main thread before any other thread starts: it blocks the
    two signals, every thread inherits that, and :meth:`wait` takes them with
    sigwait. (With ordinary handlers a process-directed signal may be delivered
    to another thread, and CPython runs the handler only when the main thread
    next wakes up: a main thread asleep in a wait would miss it for an hour.)
    Children get a clean signal mask (the reaper's spawn resets it).
    """

    SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

    def __init__(self) -> None:
        self._main = threading.get_ident()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def stop(self) -> None:
        """Ask the main thread to stop (e.g. on a Shutdown request)."""
        signal.pthread_kill(self._main, signal.SIGTERM)

    def wait(self) -> int:
        """Block until a stop is requested; the signal that said so."""
        return signal.sigwait(self.SIGNALS)


def io_factory(
    reaper: Reaper, work_dir: str | None = None
) -> Callable[[str, str, Stdio], ProcessIO]:
    """How the shim makes a process's stdio: logger binaries spawned by the reaper,
    console sockets in ``work_dir`` (default: the working directory, the bundle)."""
    from containerd_shim.stdio import ProcessIO

    def make_io(container_id: str, namespace: str, stdio: Stdio) -> ProcessIO:
        return ProcessIO(
            container_id,
            namespace,
            stdin=stdio.stdin,
            stdout=stdio.stdout,
            stderr=stdio.stderr,
            terminal=stdio.terminal,
            spawn=lambda argv, **kw: reaper.spawn(argv, **kw).pid,
            work_dir=work_dir or os.getcwd(),
        )

    return make_io


def ttrpc_server() -> ttrpc.blocking.Server:
    """The server of a shim daemon (v2 and v1): same-user peers only, and no write timeout
    (a hang-up makes containerd take the shim for dead and clean up its containers; a
    containerd too busy to read stays connected, as with Go's shims)."""
    import ttrpc
    import ttrpc.blocking

    return ttrpc.blocking.Server(handshake=ttrpc.require_same_user(), write_timeout=None)


def serve(flags: Flags) -> int:
    """Run the daemon until Shutdown or SIGTERM; the listener is fd 3 (or ``-socket``)."""
    import ttrpc
    import ttrpc.blocking
    from containerd_shim.events import Publisher
    from containerd_shim.reaper import Reaper
    from containerd_shim.service import TaskService

    if not flags.namespace:
        raise SystemExit("shim namespace cannot be empty")
    _setup_logging(flags)
    set_subreaper()
    stop = StopRequest()  # before any thread starts
    listener = ttrpc.address.listen(flags.socket) if flags.socket else socket.socket(fileno=3)
    os.set_inheritable(listener.fileno(), False)

    reaper = Reaper()
    reaper.start()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)

    make_io = io_factory(reaper)

    cgroups = None
    try:
        from containerd_shim.cgroups import Cgroups

        cgroups = Cgroups()
    except Exception:
        log.exception("cgroup support unavailable")

    service = TaskService(
        namespace=flags.namespace,
        reaper=reaper,
        publisher=publisher,
        make_io=make_io,
        on_shutdown=stop.stop,
        cgroups=cgroups,
    )
    server = ttrpc_server()
    desc = service.__ttrpc_service__()
    server.register(desc)
    # containerd 2.x speaks the same API as containerd.task.v3.Task.
    server.register(ttrpc.Service("containerd.task.v3.Task", desc.methods))
    server.start(listener)
    from containerd_shim.zygote import forked_by

    zygote = forked_by()
    how = f"forked by zygote {zygote}" if zygote else "spawned"
    log.info("serving on inherited socket, pid %d (%s)", os.getpid(), how)
    stop.wait()
    log.info("shutting down")
    server.close()
    with contextlib.suppress(OSError):
        with open("address") as f:
            address = f.read().strip()
        if address.startswith("unix://"):
            os.unlink(address[len("unix://") :])
    publisher.close(timeout=5)
    if cgroups is not None:
        cgroups.close()
    return 0
