"""The ``containerd.task.v2.Task`` service: containers and their processes, driven through runc.

This module holds no protocol code and no container logic: it translates
requests into calls on :class:`containerd_shim.containers.Containers` (shared
with the v1 shim), and their outcomes into responses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty

from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options, ProcessDetails
from containerd_shim.api.runtime.v2.task import shim_pb2 as api
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskBlockingService
from containerd_shim.api.types.task.task_pb2 import ProcessInfo
from containerd_shim.api.types.task.task_pb2 import Status as TaskStatus
from containerd_shim.containers import (
    Container,
    Containers,
    EventSink,
    make_runc,
    read_options,
    timestamp,
    validate_id,
    write_options,
)
from containerd_shim.errors import invalid_argument
from containerd_shim.events import any_of
from containerd_shim.process import State, Stdio
from containerd_shim.reaper import Reaper
from ttrpc import Context

__all__ = [
    "Container",
    "TaskService",
    "make_runc",
    "read_options",
    "timestamp",
    "validate_id",
    "write_options",
]

OPTIONS_TYPE = "containerd.runc.v1.Options"

STATUS = {
    State.CREATED: TaskStatus.CREATED,
    State.RUNNING: TaskStatus.RUNNING,
    State.PAUSING: TaskStatus.PAUSING,
    State.PAUSED: TaskStatus.PAUSED,
    State.STOPPED: TaskStatus.STOPPED,
    State.DELETED: TaskStatus.STOPPED,
}


class TaskService(TaskBlockingService):
    """``containerd.task.v2.Task`` for runc containers."""

    def __init__(
        self,
        *,
        namespace: str,
        reaper: Reaper,
        publisher: EventSink,
        make_io: Callable[[str, str, Stdio], Any],
        on_shutdown: Callable[[], None],
        cgroups: Any = None,
    ) -> None:
        self.namespace = namespace
        self.containers = Containers(
            namespace=namespace,
            reaper=reaper,
            publisher=publisher,
            make_io=make_io,
            cgroups=cgroups,
        )
        self._on_shutdown = on_shutdown

    def Create(
        self, request: api.CreateTaskRequest, ctx: Context | None = None
    ) -> api.CreateTaskResponse:
        options = Options()
        if request.HasField("options") and request.options.type_url:
            if not request.options.type_url.endswith(OPTIONS_TYPE):
                raise invalid_argument(f"unsupported runtime options {request.options.type_url}")
            options.ParseFromString(request.options.value)
        container = self.containers.create(
            request.id,
            request.bundle,
            stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
            options=options,
            rootfs=request.rootfs,
            checkpoint=request.checkpoint,
        )
        return api.CreateTaskResponse(pid=container.init.pid)

    def Start(self, request: api.StartRequest, ctx: Context | None = None) -> api.StartResponse:
        container = self.containers.get(request.id)
        process = self.containers.start(container, request.exec_id)
        return api.StartResponse(pid=process.pid)

    def Delete(self, request: api.DeleteRequest, ctx: Context | None = None) -> api.DeleteResponse:
        container = self.containers.get(request.id)
        process = self.containers.delete(container, request.exec_id)
        return api.DeleteResponse(
            pid=process.pid, exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def Exec(self, request: api.ExecProcessRequest, ctx: Context | None = None) -> Empty:
        container = self.containers.get(request.id)
        stdio = Stdio(request.stdin, request.stdout, request.stderr, request.terminal)
        self.containers.exec(container, request.exec_id, request.spec.value, stdio)
        return Empty()

    def ResizePty(self, request: api.ResizePtyRequest, ctx: Context | None = None) -> Empty:
        container = self.containers.get(request.id)
        container.process(request.exec_id).resize(request.width, request.height)
        return Empty()

    def State(self, request: api.StateRequest, ctx: Context | None = None) -> api.StateResponse:
        container = self.containers.get(request.id)
        p = container.process(request.exec_id)
        return api.StateResponse(
            id=p.id,
            bundle=container.bundle,
            pid=p.pid,
            status=STATUS[p.state],
            stdin=p.stdio.stdin,
            stdout=p.stdio.stdout,
            stderr=p.stdio.stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=timestamp(p.exited_at),
            exec_id=p.exec_id,
        )

    def Pause(self, request: api.PauseRequest, ctx: Context | None = None) -> Empty:
        self.containers.pause(self.containers.get(request.id))
        return Empty()

    def Resume(self, request: api.ResumeRequest, ctx: Context | None = None) -> Empty:
        self.containers.resume(self.containers.get(request.id))
        return Empty()

    def Kill(self, request: api.KillRequest, ctx: Context | None = None) -> Empty:
        container = self.containers.get(request.id)
        self.containers.kill(container, request.exec_id, request.signal, request.all)
        return Empty()

    def Pids(self, request: api.PidsRequest, ctx: Context | None = None) -> api.PidsResponse:
        container = self.containers.get(request.id)
        processes = []
        for pid, exec_id in self.containers.pids(container):
            info = ProcessInfo(pid=pid)
            if exec_id:
                info.info.CopyFrom(any_of(ProcessDetails(exec_id=exec_id)))
            processes.append(info)
        return api.PidsResponse(processes=processes)

    def CloseIO(self, request: api.CloseIORequest, ctx: Context | None = None) -> Empty:
        process = self.containers.get(request.id).process(request.exec_id)
        if request.stdin:
            process.close_stdin()
        return Empty()

    def Checkpoint(self, request: api.CheckpointTaskRequest, ctx: Context | None = None) -> Empty:
        container = self.containers.get(request.id)
        from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import CheckpointOptions

        opts = CheckpointOptions()
        if request.HasField("options") and request.options.value:
            opts.ParseFromString(request.options.value)
        self.containers.checkpoint(container, opts, request.path)
        return Empty()

    def Update(self, request: api.UpdateTaskRequest, ctx: Context | None = None) -> Empty:
        self.containers.update(self.containers.get(request.id), request.resources.value)
        return Empty()

    def Wait(self, request: api.WaitRequest, ctx: Context | None = None) -> api.WaitResponse:
        process = self.containers.get(request.id).process(request.exec_id)
        self.containers.wait(process, ctx)
        return api.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at)
        )

    def Stats(self, request: api.StatsRequest, ctx: Context | None = None) -> api.StatsResponse:
        stats: AnyPb = self.containers.stats(self.containers.get(request.id))
        return api.StatsResponse(stats=stats)

    def Connect(
        self, request: api.ConnectRequest, ctx: Context | None = None
    ) -> api.ConnectResponse:
        c = self.containers.find(request.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    def Shutdown(self, request: api.ShutdownRequest, ctx: Context | None = None) -> Empty:
        if len(self.containers):
            return Empty()
        self._on_shutdown()
        return Empty()
