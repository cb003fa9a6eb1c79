"""The v1 shim: ``containerd.runtime.linux.shim.v1.Shim``, one container per shim process.

This is the protocol of containerd's ``io.containerd.runtime.v1.linux`` runtime
(and of the shim client in :mod:`containerd_shim.client`). The caller listens on
a socket, starts the shim with that listener as fd 3, in the bundle directory,
with these flags::

    -namespace NS -workdir DIR -address CONTAINERD_GRPC_SOCKET
    -containerd-binary CONTAINERD [-criu-path P] [-runtime-root R] [-systemd-cgroup] [-debug]

(``-socket ADDRESS`` serves a socket of its own instead: ``unix:///path``, or an
abstract name as with Go's shim.) Requests name processes by id: the container's
id is its init process, any other id an exec process. The shim publishes
``/tasks/exit`` only, by running ``CONTAINERD --address A publish --topic T
--namespace NS`` with the event on stdin; containerd's v1 runtime publishes the
other task events itself. containerd SIGKILLs the shim right after ``Delete``;
SIGTERM kills the container and deletes it before exiting.

Run it as ``containerd-shim-pyrunc-v1`` or ``python -m containerd_shim.v1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

import ttrpc
from containerd_shim.api.runtime.linux.runctypes.runc_pb2 import (
    CheckpointOptions,
    CreateOptions,
    ProcessDetails,
)
from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2 as api
from containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc import ShimBlockingService
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options
from containerd_shim.api.types.task.task_pb2 import ProcessInfo
from containerd_shim.api.types.task.task_pb2 import Status as TaskStatus
from containerd_shim.containers import (
    Container,
    Containers,
    EventSink,
    timestamp,
)
from containerd_shim.errors import already_exists, failed_precondition, invalid_argument
from containerd_shim.flags import Flags, parse
from containerd_shim.process import Process, State, Stdio
from containerd_shim.reaper import Reaper
from ttrpc import Context

log = logging.getLogger("containerd_shim")

__all__ = ["RUNTIME", "ShimConfig", "ShimV1Service", "main", "serve"]

RUNTIME = "io.containerd.runtime.v1.linux"
CREATE_OPTIONS_TYPE = "containerd.linux.runc.CreateOptions"
CHECKPOINT_OPTIONS_TYPE = "containerd.linux.runc.CheckpointOptions"
# How long Delete waits for the exit event to leave (containerd kills the shim next).
FLUSH_TIMEOUT = 5.0
# On SIGTERM: how long to wait for the SIGKILLed container to be reaped.
STOP_TIMEOUT = 10.0

_STATUS = {
    State.CREATED: TaskStatus.CREATED,
    State.RUNNING: TaskStatus.RUNNING,
    State.PAUSING: TaskStatus.PAUSING,
    State.PAUSED: TaskStatus.PAUSED,
    State.STOPPED: TaskStatus.STOPPED,
    State.DELETED: TaskStatus.STOPPED,
}


@dataclass(frozen=True)
class ShimConfig:
    """What a v1 shim is told at start (Go's ``shim.Config``)."""

    path: str  # the bundle directory
    namespace: str
    workdir: str = ""
    criu: str = ""
    runtime_root: str = ""
    systemd_cgroup: bool = False


class _ExitsOnly:
    """containerd's v1 runtime publishes create, start, delete, exec and pause events
    itself: the shim forwards exits alone (as Go's v1 shim does)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        if topic == "/tasks/exit":
            self.sink.publish(topic, event, namespace)


class ShimV1Service(ShimBlockingService):
    """``containerd.runtime.linux.shim.v1.Shim`` for one runc container."""

    def __init__(
        self,
        config: ShimConfig,
        *,
        reaper: Reaper,
        publisher: EventSink,
        make_io: Callable[[str, str, Stdio], Any],
        flush: Callable[[float], object] | None = None,
    ) -> None:
        if not config.namespace:
            raise ValueError("shim namespace cannot be empty")
        self.config = config
        self.containers = Containers(
            namespace=config.namespace,
            reaper=reaper,
            publisher=_ExitsOnly(publisher),
            make_io=make_io,
        )
        self._flush = flush
        self._lock = threading.Lock()
        self._id = ""  # the container's id, once created
        self._bundle = ""

    # -- helpers -------------------------------------------------------------

    def _container(self) -> Container:
        with self._lock:
            container_id = self._id
        if not container_id:
            raise failed_precondition("container must be created")
        return self.containers.get(container_id)

    def _exec_id(self, process_id: str) -> str:
        """The exec id for a process id of the v1 API ("" for the init process)."""
        with self._lock:
            return "" if process_id in ("", self._id) else process_id

    def _process(self, process_id: str) -> tuple[Container, Process]:
        container = self._container()
        return container, container.process(self._exec_id(process_id))

    # -- the Shim service ----------------------------------------------------

    def Create(
        self, request: api.CreateTaskRequest, ctx: Context | None = None
    ) -> api.CreateTaskResponse:
        create = CreateOptions()
        if request.HasField("options") and request.options.type_url:
            if not request.options.type_url.endswith(CREATE_OPTIONS_TYPE):
                raise invalid_argument(f"unsupported create options {request.options.type_url}")
            create.ParseFromString(request.options.value)
        options = Options(
            binary_name=request.runtime,
            root=self.config.runtime_root,
            criu_path=self.config.criu,
            systemd_cgroup=self.config.systemd_cgroup,
            no_pivot_root=create.no_pivot_root,
            no_new_keyring=create.no_new_keyring,
            shim_cgroup=create.shim_cgroup,
            io_uid=create.io_uid,
            io_gid=create.io_gid,
            criu_work_path=create.criu_work_path,
        )
        with self._lock:
            if self._id:
                raise already_exists(f"this shim already runs container {self._id}")
            self._id = request.id  # reserved; released below if create fails
        try:
            container = self.containers.create(
                request.id,
                request.bundle,
                stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
                options=options,
                rootfs=request.rootfs,
                checkpoint=request.checkpoint,
            )
        except BaseException:
            with self._lock:
                self._id = ""
            raise
        self._bundle = request.bundle
        return api.CreateTaskResponse(pid=container.init.pid)

    def Start(self, request: api.StartRequest, ctx: Context | None = None) -> api.StartResponse:
        container = self._container()
        process = self.containers.start(container, self._exec_id(request.id))
        return api.StartResponse(id=process.id, pid=process.pid)

    def Delete(self, request: Empty, ctx: Context | None = None) -> api.DeleteResponse:
        process = self.containers.delete(self._container(), "")
        # containerd SIGKILLs the shim as soon as Delete answers: let the exit
        # event leave first, so that it is never lost or seen after the delete.
        if self._flush is not None:
            self._flush(FLUSH_TIMEOUT)
        return api.DeleteResponse(
            pid=process.pid, exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def DeleteProcess(
        self, request: api.DeleteProcessRequest, ctx: Context | None = None
    ) -> api.DeleteResponse:
        exec_id = self._exec_id(request.id)
        if not exec_id:
            raise invalid_argument("cannot delete init process with DeleteProcess")
        process = self.containers.delete(self._container(), exec_id)
        return api.DeleteResponse(
            pid=process.pid, exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def ListPids(
        self, request: api.ListPidsRequest, ctx: Context | None = None
    ) -> api.ListPidsResponse:
        from containerd_shim.events import any_of

        container = self._container()
        processes = []
        for pid, exec_id in self.containers.pids(container):
            info = ProcessInfo(pid=pid)
            # Go's v1 shim labels the init process too, with the container's id.
            if exec_id or pid == container.init.pid:
                details = ProcessDetails(exec_id=exec_id or container.id)
                info.info.CopyFrom(any_of(details))
            processes.append(info)
        return api.ListPidsResponse(processes=processes)

    def Pause(self, request: Empty, ctx: Context | None = None) -> Empty:
        self.containers.pause(self._container())
        return Empty()

    def Resume(self, request: Empty, ctx: Context | None = None) -> Empty:
        self.containers.resume(self._container())
        return Empty()

    def Checkpoint(self, request: api.CheckpointTaskRequest, ctx: Context | None = None) -> Empty:
        container = self._container()
        opts = CheckpointOptions()
        if request.HasField("options") and request.options.value:
            if not request.options.type_url.endswith(CHECKPOINT_OPTIONS_TYPE):
                raise invalid_argument(f"unsupported checkpoint options {request.options.type_url}")
            opts.ParseFromString(request.options.value)
        self.containers.checkpoint(container, opts, request.path)
        return Empty()

    def Kill(self, request: api.KillRequest, ctx: Context | None = None) -> Empty:
        container = self._container()
        self.containers.kill(container, self._exec_id(request.id), request.signal, request.all)
        return Empty()

    def Exec(self, request: api.ExecProcessRequest, ctx: Context | None = None) -> Empty:
        container = self._container()
        if request.id and not self._exec_id(request.id):
            raise already_exists(f"id {request.id}")  # the init process's id
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        self.containers.exec(container, request.id, request.spec.value, stdio)
        return Empty()

    def ResizePty(self, request: api.ResizePtyRequest, ctx: Context | None = None) -> Empty:
        if not request.id:
            raise invalid_argument("id not provided")
        _, process = self._process(request.id)
        process.resize(request.width, request.height)
        return Empty()

    def CloseIO(self, request: api.CloseIORequest, ctx: Context | None = None) -> Empty:
        _, process = self._process(request.id)
        if request.stdin:
            process.close_stdin()
        return Empty()

    def ShimInfo(self, request: Empty, ctx: Context | None = None) -> api.ShimInfoResponse:
        return api.ShimInfoResponse(shim_pid=os.getpid())

    def Update(self, request: api.UpdateTaskRequest, ctx: Context | None = None) -> Empty:
        self.containers.update(self._container(), request.resources.value)
        return Empty()

    def Wait(self, request: api.WaitRequest, ctx: Context | None = None) -> api.WaitResponse:
        _, process = self._process(request.id)
        self.containers.wait(process, ctx)
        return api.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def State(self, request: api.StateRequest, ctx: Context | None = None) -> api.StateResponse:
        _, p = self._process(request.id)
        return api.StateResponse(
            id=p.id,
            bundle=self._bundle,
            pid=p.pid,
            status=_STATUS[p.state],
            stdin=p.stdio.stdin,
            stdout=p.stdio.stdout,
            stderr=p.stdio.stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=timestamp(p.exited_at),
        )

    # -- not part of the API ---------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Kill the container (SIGKILL to all its processes) and delete it, as on SIGTERM."""
        with self._lock:
            container_id = self._id
        container = self.containers.find(container_id) if container_id else None
        if container is None:
            return
        with contextlib.suppress(ttrpc.RpcError):
            self.containers.kill(container, "", signal.SIGKILL, True)
        if container.init.state != State.CREATED and not container.init.wait(timeout):
            log.error("container %s still running %.0fs after SIGKILL", container_id, timeout)
        try:
            self.containers.delete(container, "")
        except ttrpc.RpcError as exc:
            log.error("delete %s on shutdown: %s", container_id, exc.message)


def _listener(flags: Flags) -> socket.socket:
    """fd 3, or ``-socket``: ``unix:///path`` (or ``unix://@name``), else an abstract name
    (what Go's v1 shim does with a bare ``-socket``)."""
    from ttrpc.address import listen

    if not flags.socket:
        return socket.socket(fileno=3)
    if flags.socket.startswith("unix://"):
        return listen(flags.socket)
    return listen("unix://@" + flags.socket.lstrip("@"))


def _setup_logging(flags: Flags) -> None:
    """Log in containerd's text format to stderr (containerd's shim.stderr.log fifo)."""
    from containerd_shim.serve import ContainerdLogHandler

    try:
        # Our own open file description, so non-blocking mode does not leak to
        # whoever shares stderr with us; a reader that went away drops lines.
        fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = os.dup(2)
    fields = {"namespace": flags.namespace, "path": os.getcwd(), "pid": str(os.getpid())}
    handler = ContainerdLogHandler(fd, fields)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)


def serve(flags: Flags) -> int:
    """Serve the v1 Shim API on fd 3 (or ``-socket``) until SIGTERM or SIGINT."""
    from containerd_shim.events import BinaryPublisher
    from containerd_shim.serve import StopRequest, io_factory, set_subreaper, ttrpc_server

    if not flags.namespace:
        raise SystemExit("shim namespace cannot be empty")
    _setup_logging(flags)
    set_subreaper()
    stop = StopRequest()  # before any thread starts
    listener = _listener(flags)
    os.set_inheritable(listener.fileno(), False)

    reaper = Reaper()
    reaper.start()
    publisher = BinaryPublisher(
        flags.containerd_binary or "containerd", flags.address, flags.namespace, reaper
    )
    config = ShimConfig(
        path=os.getcwd(),
        namespace=flags.namespace,
        workdir=flags.workdir,
        criu=flags.criu_path,
        runtime_root=flags.runtime_root,
        systemd_cgroup=flags.systemd_cgroup,
    )
    service = ShimV1Service(
        config,
        reaper=reaper,
        publisher=publisher,
        make_io=io_factory(reaper),
        flush=publisher.flush,
    )
    server = ttrpc_server()
    server.register(service)
    server.start(listener)
    log.info("serving %s on %s, pid %d", RUNTIME, flags.socket or "inherited socket", os.getpid())
    log.info("shutting down on signal %d", stop.wait())
    server.close()
    service.stop()
    publisher.close(timeout=FLUSH_TIMEOUT)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``containerd-shim-pyrunc-v1 FLAGS``: the v1 shim process."""
    try:
        flags = parse(sys.argv[1:] if argv is None else argv)
        if flags.version:
            from ttrpc import __version__

            print(f"{os.path.basename(sys.argv[0])}:")
            print(f"  Version:  {__version__}")
            print(f"  Runtime:  {RUNTIME}")
            return 0
        if flags.action:
            raise SystemExit(f"unexpected argument {flags.action!r} (the v1 shim has no actions)")
        return serve(flags)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            sys.stderr.write(f"containerd-shim-pyrunc-v1: {exc.code}\n")
            return 1
        raise
    except Exception as exc:
        sys.stderr.write(f"containerd-shim-pyrunc-v1: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
