"""Containers and their processes, whichever shim API exposes them.

Both shim APIs (``containerd.task.v2.Task`` in :mod:`containerd_shim.service`,
``containerd.runtime.linux.shim.v1.Shim`` in :mod:`containerd_shim.v1`) are thin
translations of their requests into calls on :class:`Containers`, which owns the
containers of one shim: creating them through runc (mounting their rootfs),
starting, signalling and deleting init and exec processes, and publishing the
task events that follow (create, start, exit, delete, exec, pause, OOM ...).
Errors are raised as ttrpc statuses (:mod:`containerd_shim.errors`).

This module imports no API of its own (and not the cgroup code): the v1 shim
stays light.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from containerd_shim import mount
from containerd_shim.api.events import task_pb2 as events
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options
from containerd_shim.api.types.mount_pb2 import Mount
from containerd_shim.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    unimplemented,
)
from containerd_shim.ids import ID_RULE, MAX_ID, is_valid_id
from containerd_shim.process import ExecProcess, InitProcess, Process, State, Stdio
from containerd_shim.reaper import Exit, Reaper
from containerd_shim.runc import DEFAULT_ROOT, Runc, RuncError
from ttrpc import Code, Context, RpcError

log = logging.getLogger("containerd_shim")

__all__ = [
    "Container",
    "Containers",
    "EventSink",
    "make_runc",
    "read_options",
    "timestamp",
    "validate_id",
    "write_options",
]

OPTIONS_FILE = "options.json"


class CheckpointOptions(Protocol):
    """containerd's runc checkpoint options (the v2 ``containerd.runc.v1.CheckpointOptions``
    and the v1 ``containerd.linux.runc.CheckpointOptions`` share these fields)."""

    @property
    def exit(self) -> bool: ...
    @property
    def open_tcp(self) -> bool: ...
    @property
    def external_unix_sockets(self) -> bool: ...
    @property
    def terminal(self) -> bool: ...
    @property
    def file_locks(self) -> bool: ...
    @property
    def image_path(self) -> str: ...
    @property
    def work_path(self) -> str: ...


class EventSink(Protocol):
    """Where task events go (:class:`containerd_shim.events.Publisher` and friends)."""

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None: ...


def validate_id(value: str, what: str = "id") -> str:
    """Reject ids that could escape a directory or confuse runc."""
    if not is_valid_id(value):
        raise invalid_argument(f"{what} {value!r}: must match {ID_RULE} (at most {MAX_ID})")
    return value


# Go's zero time.Time (0001-01-01T00:00:00Z): what containerd's Go shims report for
# "not exited yet", and what containerd's IsZero() checks expect.
_GO_ZERO_TIME_SECONDS = -62135596800


def timestamp(seconds: float | None) -> Timestamp:
    """A protobuf timestamp; ``None`` (no exit yet) becomes Go's zero time, as Go's shims send."""
    if seconds is None:
        return Timestamp(seconds=_GO_ZERO_TIME_SECONDS)
    stamp = Timestamp()
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


class Containers:
    """The containers of one shim, driven through runc."""

    def __init__(
        self,
        *,
        namespace: str,
        reaper: Reaper,
        publisher: EventSink,
        make_io: Callable[[str, str, Stdio], Any],
        cgroups: Any = None,
    ) -> None:
        self.namespace = namespace
        self.reaper = reaper
        self.publisher = publisher
        self._make_io = make_io
        self.cgroups = cgroups
        self._containers: dict[str, Container] = {}
        self._lock = threading.Lock()

    # -- lookup ---------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise not_found(f"container {container_id} does not exist")
        return c

    def find(self, container_id: str) -> Container | None:
        """The container, or None (also while it is being created)."""
        with self._lock:
            return self._containers.get(container_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._containers)

    # -- events and exits -----------------------------------------------------

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
        container = self.find(process.container_id)
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

    def _oom(self, container_id: str) -> None:
        self._publish("/tasks/oom", events.TaskOOM(container_id=container_id))

    # -- lifecycle ------------------------------------------------------------

    def create(
        self,
        container_id: str,
        bundle: str,
        *,
        stdio: Stdio,
        options: Options,
        rootfs: Sequence[Mount] = (),
        checkpoint: str = "",
    ) -> Container:
        """``runc create`` the container of ``bundle`` (mounting ``rootfs`` first)."""
        validate_id(container_id)
        given_bundle = bundle
        bundle = os.path.realpath(bundle)
        if not os.path.isfile(os.path.join(bundle, "config.json")):
            raise invalid_argument(f"bundle {given_bundle!r} has no config.json")
        if checkpoint:
            raise unimplemented(
                "restoring from a checkpoint is not supported (criu does not work here)"
            )
        with self._lock:
            if container_id in self._containers:
                raise already_exists(f"container {container_id} already exists")
            # Reserve the id while creating (Create can take a while).
            self._containers[container_id] = None  # type: ignore[assignment]
        rootfs_dir = os.path.join(bundle, "rootfs")
        mounted = False
        try:
            write_options(bundle, options)
            if rootfs:
                os.makedirs(rootfs_dir, exist_ok=True)
                mount.mount_all(self.reaper, rootfs, rootfs_dir)
                mounted = True
            runc = make_runc(self.reaper, bundle, self.namespace, options)
            init = InitProcess(container_id, bundle, runc, stdio)
            container = Container(init, options, rootfs_dir, mounted)
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
                    mount.unmount_all(self.reaper, rootfs_dir)
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
                bundle=given_bundle,
                rootfs=rootfs,
                io=events.TaskIO(
                    stdin=stdio.stdin,
                    stdout=stdio.stdout,
                    stderr=stdio.stderr,
                    terminal=stdio.terminal,
                ),
                checkpoint=checkpoint,
                pid=init.pid,
            ),
        )
        return container

    def start(self, container: Container, exec_id: str) -> Process:
        """Start the init process (``runc start``) or an exec process (``runc exec``)."""
        process = container.process(exec_id)
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
        return process

    def delete(self, container: Container, exec_id: str) -> Process:
        """Delete a stopped process: the container itself (runc delete, unmount) for the init."""
        process = container.process(exec_id)
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
        return process

    def exec(self, container: Container, exec_id: str, spec: bytes, stdio: Stdio) -> ExecProcess:
        """Register an exec process (``spec``: the OCI process as JSON); start() runs it."""
        validate_id(exec_id, "exec id")
        if container.init.state in (State.STOPPED, State.DELETED):
            raise failed_precondition(f"container {container.id} is not running")
        try:
            json.loads(spec)
        except ValueError:
            raise invalid_argument("exec spec is not a JSON process") from None
        with container.lock:
            if exec_id in container.execs:
                raise already_exists(f"id {exec_id}")
            process = container.execs[exec_id] = ExecProcess(exec_id, container.init, spec, stdio)
        self._publish(
            "/tasks/exec-added", events.TaskExecAdded(container_id=container.id, exec_id=exec_id)
        )
        return process

    def pause(self, container: Container) -> None:
        try:
            container.init.pause()
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        self._publish("/tasks/paused", events.TaskPaused(container_id=container.id))

    def resume(self, container: Container) -> None:
        try:
            container.init.resume()
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        self._publish("/tasks/resumed", events.TaskResumed(container_id=container.id))

    def kill(self, container: Container, exec_id: str, signal: int, all_processes: bool) -> None:
        process = container.process(exec_id)
        if not 0 < signal < 65:
            raise invalid_argument(f"invalid signal {signal}")
        try:
            if isinstance(process, InitProcess):
                process.kill(signal, all_processes)
            else:
                assert isinstance(process, ExecProcess)
                process.kill(signal)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None

    def pids(self, container: Container) -> list[tuple[int, str]]:
        """The container's processes: ``(pid, exec id)``, the exec id empty for others."""
        try:
            pids = container.init.runc.ps(container.id)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        execs = {p.pid: p.id for p in container.all_processes() if isinstance(p, ExecProcess)}
        return [(pid, execs.get(pid, "")) for pid in pids]

    def checkpoint(self, container: Container, options: CheckpointOptions, path: str) -> None:
        """``runc checkpoint`` into ``options.image_path``, else the request's ``path``."""
        image = options.image_path or path
        if not image:
            raise invalid_argument("checkpoint needs an image path")
        try:
            container.init.runc.checkpoint(
                container.id,
                image_path=image,
                work_path=options.work_path or os.path.join(container.bundle, "criu-work"),
                exit_after=options.exit,
                options=_checkpoint_flags(options),
            )
        except RuncError as exc:
            raise RpcError(Code.FAILED_PRECONDITION, f"checkpoint failed: {exc.message}") from None
        self._publish(
            "/tasks/checkpointed",
            events.TaskCheckpointed(container_id=container.id, checkpoint=image),
        )

    def update(self, container: Container, resources: bytes) -> None:
        """``runc update`` with ``resources`` (JSON LinuxResources)."""
        try:
            data = json.loads(resources)
        except ValueError:
            raise invalid_argument("resources are not JSON LinuxResources") from None
        path = os.path.join(container.bundle, ".update-resources.json")
        with open(path, "w") as f:
            json.dump(data, f)
        try:
            container.init.runc.update(container.id, path)
        except RuncError as exc:
            raise RpcError(Code.UNKNOWN, exc.message) from None
        finally:
            os.unlink(path)

    @staticmethod
    def wait(process: Process, ctx: Context | None) -> None:
        """Block until ``process`` has exited (and its exit is published)."""
        while not process.wait(1.0):
            if ctx is not None and ctx.cancelled:
                raise RpcError(Code.CANCELLED, "wait cancelled")

    def stats(self, container: Container) -> Any:
        if self.cgroups is None:
            raise not_found("cgroup does not exist")
        return self.cgroups.stats(container.id, container.init.pid)


def _checkpoint_flags(options: CheckpointOptions) -> list[str]:
    """runc checkpoint flags for containerd's checkpoint options."""
    flags = []
    if options.open_tcp:
        flags.append("--tcp-established")
    if options.external_unix_sockets:
        flags.append("--ext-unix-sk")
    if options.terminal:
        flags.append("--shell-job")
    if options.file_locks:
        flags.append("--file-locks")
    return flags
