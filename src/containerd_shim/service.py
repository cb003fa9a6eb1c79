"""The ``containerd.task.v2.Task`` service: containers and their processes, driven through runc.

This module holds no protocol code: it turns requests into calls on
containers and processes, and their outcomes into responses and events.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from containerd_shim import mount
from containerd_shim.api.events import task_pb2 as events
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options, ProcessDetails
from containerd_shim.api.runtime.v2.task import shim_pb2 as api
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskBlockingService
from containerd_shim.api.types.task.task_pb2 import ProcessInfo
from containerd_shim.api.types.task.task_pb2 import Status as TaskStatus
from containerd_shim.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    unimplemented,
)
from containerd_shim.events import Publisher, any_of
from containerd_shim.process import ExecProcess, InitProcess, Process, State, Stdio
from containerd_shim.reaper import Exit, Reaper
from containerd_shim.runc import DEFAULT_ROOT, Runc, RuncError
from ttrpc import Code, Context, RpcError

log = logging.getLogger("containerd_shim")

__all__ = ["Container", "TaskService", "validate_id"]

# containerd's identifier rule (identifiers.Validate): alphanumerics separated by . _ -
_ID = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
_MAX_ID = 76

OPTIONS_TYPE = "containerd.runc.v1.Options"
OPTIONS_FILE = "options.json"

_STATUS = {
    State.CREATED: TaskStatus.CREATED,
    State.RUNNING: TaskStatus.RUNNING,
    State.PAUSING: TaskStatus.PAUSING,
    State.PAUSED: TaskStatus.PAUSED,
    State.STOPPED: TaskStatus.STOPPED,
    State.DELETED: TaskStatus.STOPPED,
}


def validate_id(value: str, what: str = "id") -> str:
    """Reject ids that could escape a directory or confuse runc."""
    if not value or len(value) > _MAX_ID or not _ID.match(value):
        raise invalid_argument(f"{what} {value!r}: must match {_ID.pattern} (at most {_MAX_ID})")
    return value


def timestamp(seconds: float | None) -> Timestamp:
    stamp = Timestamp()
    if seconds is not None:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def read_options(bundle: str) -> Options:
    """Options a Create stored in the bundle (the ``delete`` command needs runc's root)."""
    options = Options()
    try:
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return options
    for key, value in data.items():
        if key in Options.DESCRIPTOR.fields_by_name:
            setattr(options, key, value)
    return options


def write_options(bundle: str, options: Options) -> None:
    data = {f.name: getattr(options, f.name) for f in Options.DESCRIPTOR.fields}
    with open(os.path.join(bundle, OPTIONS_FILE), "w") as f:
        json.dump(data, f)


def make_runc(reaper: Reaper, bundle: str, namespace: str, options: Options) -> Runc:
    return Runc(
        reaper,
        binary=options.binary_name or "runc",
        root=os.path.join(options.root or DEFAULT_ROOT, namespace),
        log_path=os.path.join(bundle, "log.json"),
        systemd_cgroup=options.systemd_cgroup,
        criu=options.criu_path,
    )


class Container:
    """One task: its bundle, rootfs, init process and exec processes."""

    def __init__(self, init: InitProcess, options: Options, rootfs: str, mounted: bool) -> None:
        self.id = init.id
        self.bundle = init.bundle
        self.init = init
        self.options = options
        self.rootfs = rootfs
        self.mounted = mounted
        self.execs: dict[str, ExecProcess] = {}
        self.lock = threading.Lock()
        # Held while a process starts and its start event is queued, so that an
        # exit can never be published before the start it follows.
        self.event_lock = threading.Lock()

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        with self.lock:
            p = self.execs.get(exec_id)
        if p is None:
            raise not_found(f"process {exec_id} does not exist")
        return p

    def all_processes(self) -> list[Process]:
        with self.lock:
            return [self.init, *self.execs.values()]


class TaskService(TaskBlockingService):
    """``containerd.task.v2.Task`` for runc containers."""

    def __init__(
        self,
        *,
        namespace: str,
        reaper: Reaper,
        publisher: Publisher,
        make_io: Callable[[str, str, Stdio], Any],
        on_shutdown: Callable[[], None],
        cgroups: Any = None,
    ) -> None:
        self.namespace = namespace
        self.reaper = reaper
        self.publisher = publisher
        self._make_io = make_io
        self._on_shutdown = on_shutdown
        self.cgroups = cgroups
        self._containers: dict[str, Container] = {}
        self._lock = threading.Lock()

    # -- helpers -------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise not_found(f"container {container_id} does not exist")
        return c

    def _publish(self, topic: str, event: Message) -> None:
        self.publisher.publish(topic, event)

    def _io_factory(self, container_id: str) -> Callable[[Stdio], Any]:
        return lambda stdio: self._make_io(container_id, self.namespace, stdio)

    def _on_exit(self, process: Process, exit_: Exit) -> None:
        # Called on the reaper thread, which must never block: handle it elsewhere.
        threading.Thread(
            target=self._handle_exit, args=(process, exit_), name=f"exit-{process.pid}", daemon=True
        ).start()

    def _handle_exit(self, process: Process, exit_: Exit) -> None:
        process.record_exit(exit_)
        try:
            container = self._container(process.container_id)
        except RpcError:
            container = None
        if container is not None and isinstance(process, InitProcess):
            # Exec processes die with the init (shared pid namespace): report them first.
            for p in container.all_processes():
                if p is not process and p.state != State.CREATED:
                    p.wait(5)
        lock = container.event_lock if container is not None else threading.Lock()
        with lock:
            self._publish(
                "/tasks/exit",
                events.TaskExit(
                    container_id=process.container_id,
                    id=process.id,
                    pid=process.pid,
                    exit_status=exit_.status,
                    exited_at=timestamp(exit_.exited_at),
                ),
            )
            process.mark_exited()
        if self.cgroups is not None and isinstance(process, InitProcess):
            self.cgroups.forget(process.container_id)

    # -- Task service --------------------------------------------------------

    def Create(
        self, request: api.CreateTaskRequest, ctx: Context | None = None
    ) -> api.CreateTaskResponse:
        container_id = validate_id(request.id)
        bundle = os.path.realpath(request.bundle)
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise invalid_argument(f"bundle {request.bundle!r} has no config.json")
        if request.checkpoint:
            raise unimplemented(
                "restoring from a checkpoint is not supported (criu does not work here)"
            )
        options = Options()
        if request.HasField("options") and request.options.type_url:
            if not request.options.type_url.endswith(OPTIONS_TYPE):
                raise invalid_argument(f"unsupported runtime options {request.options.type_url}")
            options.ParseFromString(request.options.value)
        with self._lock:
            if container_id in self._containers:
                raise already_exists(f"container {container_id} already exists")
            # Reserve the id while creating (Create can take a while).
            self._containers[container_id] = None  # type: ignore[assignment]
        rootfs = os.path.join(bundle, "rootfs")
        mounted = False
        try:
            write_options(bundle, options)
            if request.rootfs:
                os.makedirs(rootfs, exist_ok=True)
                mount.mount_all(self.reaper, request.rootfs, rootfs)
                mounted = True
            runc = make_runc(self.reaper, bundle, self.namespace, options)
            stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
            init = InitProcess(container_id, bundle, runc, stdio)
            container = Container(init, options, rootfs, mounted)
            init.create(
                self.reaper,
                self._io_factory(container_id),
                no_pivot=options.no_pivot_root,
                no_new_keyring=options.no_new_keyring,
                on_exit=self._on_exit,
            )
        except BaseException as exc:
            with self._lock:
                self._containers.pop(container_id, None)
            if mounted:
                try:
                    mount.unmount_all(self.reaper, rootfs)
                except mount.MountError:
                    log.exception("cleanup after failed create")
            if isinstance(exc, RuncError):
                raise RpcError(Code.UNKNOWN, f"OCI runtime create failed: {exc.message}") from None
            if isinstance(exc, mount.MountError):
                raise RpcError(Code.UNKNOWN, f"failed to mount rootfs component: {exc}") from None
            raise
        with self._lock:
            self._containers[container_id] = container
        self._publish(
            "/tasks/create",
            events.TaskCreate(
                container_id=container_id,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events.TaskIO(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                checkpoint=request.checkpoint,
                pid=init.pid,
            ),
        )
        return api.CreateTaskResponse(pid=init.pid)

    def Start(self, request: api.StartRequest, ctx: Context | None = None) -> api.StartResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        with container.event_lock:
            try:
                if isinstance(process, InitProcess):
                    process.start()
                    if self.cgroups is not None:
                        self.cgroups.watch(container.id, process.pid, self._oom)
                    self._publish(
                        "/tasks/start", events.TaskStart(container_id=container.id, pid=process.pid)
                    )
                else:
                    assert isinstance(process, ExecProcess)
                    if container.init.state not in (State.RUNNING, State.CREATED):
                        raise failed_precondition(f"container {container.id} is not running")
                    process.start(self.reaper, self._io_factory(container.id), self._on_exit)
                    self._publish(
                        "/tasks/exec-started",
                        events.TaskExecStarted(
                            container_id=container.id, exec_id=process.id, pid=process.pid
                        ),
                    )
            except RuncError as exc:
                raise RpcError(Code.UNKNOWN, f"OCI runtime start failed: {exc.message}") from None
        return api.StartResponse(pid=process.pid)

    def _oom(self, container_id: str) -> None:
        self._publish("/tasks/oom", events.TaskOOM(container_id=container_id))

    def Delete(self, request: api.DeleteRequest, ctx: Context | None = None) -> api.DeleteResponse:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        try:
            if isinstance(process, InitProcess):
                with container.lock:
                    running = [p for p in container.execs.values() if p.state == State.RUNNING]
                if running:
                    raise failed_precondition(
                        "cannot delete a container with running exec processes"
                    )
                process.delete()
                if container.mounted:
                    mount.unmount_all(self.reaper, container.rootfs)
                    container.mounted = False
                with self._lock:
                    self._containers.pop(container.id, None)
                if self.cgroups is not None:
                    self.cgroups.forget(container.id)
                self._publish(
                    "/tasks/delete",
                    events.TaskDelete(
                        container_id=container.id,
                        pid=process.pid,
                        exit_status=process.exit_status,
                        exited_at=timestamp(process.exited_at),
                        id=container.id,
                    ),
                )
            else:
                assert isinstance(process, ExecProcess)
                process.delete()
                with container.lock:
                    container.execs.pop(process.id, None)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, f"failed to delete task: {exc.message}") from None
        except mount.MountError as exc:
            raise RpcError(Code.UNKNOWN, f"failed rootfs umount: {exc}") from None
        return api.DeleteResponse(
            pid=process.pid, exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def Exec(self, request: api.ExecProcessRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        exec_id = validate_id(request.exec_id, "exec id")
        if container.init.state in (State.STOPPED, State.DELETED):
            raise failed_precondition(f"container {container.id} is not running")
        try:
            json.loads(request.spec.value)
        except ValueError:
            raise invalid_argument("exec spec is not a JSON process") from None
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        with container.lock:
            if exec_id in container.execs:
                raise already_exists(f"id {exec_id}")
            container.execs[exec_id] = ExecProcess(
                exec_id, container.init, request.spec.value, stdio
            )
        self._publish(
            "/tasks/exec-added", events.TaskExecAdded(container_id=container.id, exec_id=exec_id)
        )
        return Empty()

    def ResizePty(self, request: api.ResizePtyRequest, ctx: Context | None = None) -> Empty:
        self._container(request.id).process(request.exec_id).resize(request.width, request.height)
        return Empty()

    def State(self, request: api.StateRequest, ctx: Context | None = None) -> api.StateResponse:
        container = self._container(request.id)
        p = container.process(request.exec_id)
        return api.StateResponse(
            id=p.id,
            bundle=container.bundle,
            pid=p.pid,
            status=_STATUS[p.state],
            stdin=p.stdio.stdin,
            stdout=p.stdio.stdout,
            stderr=p.stdio.stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=timestamp(p.exited_at),
            exec_id=p.exec_id,
        )

    def Pause(self, request: api.PauseRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        try:
            container.init.pause()
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        self._publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return Empty()

    def Resume(self, request: api.ResumeRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        try:
            container.init.resume()
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        self._publish("/tasks/resumed", events.TaskResumed(container_id=container.id))
        return Empty()

    def Kill(self, request: api.KillRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        process = container.process(request.exec_id)
        if not 0 < request.signal < 65:
            raise invalid_argument(f"invalid signal {request.signal}")
        try:
            if isinstance(process, InitProcess):
                process.kill(request.signal, request.all)
            else:
                assert isinstance(process, ExecProcess)
                process.kill(request.signal)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        return Empty()

    def Pids(self, request: api.PidsRequest, ctx: Context | None = None) -> api.PidsResponse:
        container = self._container(request.id)
        try:
            pids = container.init.runc.ps(container.id)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        execs = {p.pid: p.id for p in container.all_processes() if isinstance(p, ExecProcess)}
        processes = []
        for pid in pids:
            info = ProcessInfo(pid=pid)
            if pid in execs:
                info.info.CopyFrom(any_of(ProcessDetails(exec_id=execs[pid])))
            processes.append(info)
        return api.PidsResponse(processes=processes)

    def CloseIO(self, request: api.CloseIORequest, ctx: Context | None = None) -> Empty:
        process = self._container(request.id).process(request.exec_id)
        if request.stdin:
            process.close_stdin()
        return Empty()

    def Checkpoint(self, request: api.CheckpointTaskRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import CheckpointOptions

        opts = CheckpointOptions()
        if request.HasField("options") and request.options.value:
            opts.ParseFromString(request.options.value)
        image = opts.image_path or request.path
        if not image:
            raise invalid_argument("checkpoint needs an image path")
        work = opts.work_path or os.path.join(container.bundle, "criu-work")
        flags = []
        if opts.open_tcp:
            flags.append("--tcp-established")
        if opts.external_unix_sockets:
            flags.append("--ext-unix-sk")
        if opts.terminal:
            flags.append("--shell-job")
        if opts.file_locks:
            flags.append("--file-locks")
        try:
            container.init.runc.checkpoint(
                container.id, image_path=image, work_path=work, exit_after=opts.exit, options=flags
            )
        except RuncError as exc:
            raise RpcError(Code.FAILED_PRECONDITION, f"checkpoint failed: {exc.message}") from None
        self._publish(
            "/tasks/checkpointed",
            events.TaskCheckpointed(container_id=container.id, checkpoint=image),
        )
        return Empty()

    def Update(self, request: api.UpdateTaskRequest, ctx: Context | None = None) -> Empty:
        container = self._container(request.id)
        try:
            resources = json.loads(request.resources.value)
        except ValueError:
            raise invalid_argument("resources are not JSON LinuxResources") from None
        path = os.path.join(container.bundle, ".update-resources.json")
        with open(path, "w") as f:
            json.dump(resources, f)
        try:
            container.init.runc.update(container.id, path)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        finally:
            os.unlink(path)
        return Empty()

    def Wait(self, request: api.WaitRequest, ctx: Context | None = None) -> api.WaitResponse:
        process = self._container(request.id).process(request.exec_id)
        while not process.wait(1.0):
            if ctx is not None and ctx.cancelled:
                raise RpcError(Code.CANCELLED, "wait cancelled")
        return api.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def Stats(self, request: api.StatsRequest, ctx: Context | None = None) -> api.StatsResponse:
        container = self._container(request.id)
        if self.cgroups is None:
            raise not_found("cgroup does not exist")
        stats: AnyPb = self.cgroups.stats(container.id, container.init.pid)
        return api.StatsResponse(stats=stats)

    def Connect(
        self, request: api.ConnectRequest, ctx: Context | None = None
    ) -> api.ConnectResponse:
        with self._lock:
            c = self._containers.get(request.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    def Shutdown(self, request: api.ShutdownRequest, ctx: Context | None = None) -> Empty:
        with self._lock:
            if self._containers:
                return Empty()
        self._on_shutdown()
        return Empty()
