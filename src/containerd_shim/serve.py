"""The shim daemon: serves the Task API on the listener inherited as fd 3 until shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

from containerd_shim.flags import Flags

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


def _set_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def serve(flags: Flags) -> int:
    """Run the daemon until Shutdown or SIGTERM; the listener is fd 3 (or ``-socket``)."""
    import ttrpc
    import ttrpc.blocking
    from containerd_shim.events import Publisher
    from containerd_shim.reaper import Reaper
    from containerd_shim.service import TaskService
    from containerd_shim.stdio import ProcessIO

    if not flags.namespace:
        raise SystemExit("shim namespace cannot be empty")
    _setup_logging(flags)
    _set_subreaper()
    listener = ttrpc.address.listen(flags.socket) if flags.socket else socket.socket(fileno=3)
    os.set_inheritable(listener.fileno(), False)

    reaper = Reaper()
    reaper.start()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    stopping = threading.Event()

    def make_io(container_id: str, namespace: str, stdio: object) -> ProcessIO:
        return ProcessIO(
            container_id,
            namespace,
            stdin=stdio.stdin,  # type: ignore[attr-defined]
            stdout=stdio.stdout,  # type: ignore[attr-defined]
            stderr=stdio.stderr,  # type: ignore[attr-defined]
            terminal=stdio.terminal,  # type: ignore[attr-defined]
            spawn=lambda argv, **kw: reaper.spawn(argv, **kw).pid,
            work_dir=os.getcwd(),
        )

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
        on_shutdown=stopping.set,
        cgroups=cgroups,
    )
    server = ttrpc.blocking.Server(handshake=ttrpc.require_same_user())
    desc = service.__ttrpc_service__()
    server.register(desc)
    # containerd 2.x speaks the same API as containerd.task.v3.Task.
    server.register(ttrpc.Service("containerd.task.v3.Task", desc.methods))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    server.start(listener)
    log.info("serving on inherited socket, pid %d", os.getpid())
    while not stopping.wait(3600):
        pass
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
