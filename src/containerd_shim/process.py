"""Container processes: the init process and exec processes, each with explicit state.

State changes happen under each process's lock. Exits arrive from the
reaper; a process only counts as exited (``wait`` returns) once its output
has been copied out and its exit event published, so nothing that follows
(``Wait``, ``Delete``) can overtake the exit.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from containerd_shim.errors import failed_precondition, not_found
from containerd_shim.reaper import Exit, Reaper
from containerd_shim.runc import Runc, RuncError

if TYPE_CHECKING:
    from containerd_shim.stdio import ProcessIO

log = logging.getLogger("containerd_shim")

__all__ = ["ExecProcess", "InitProcess", "Process", "State", "Stdio"]

# How long an exit waits for the process's output to drain (a background child
# may hold the pipe open after the process itself is gone).
OUTPUT_DRAIN_TIMEOUT = 2.0


class State(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Process:
    """What init and exec processes share: pid, state, exit, stdio."""

    def __init__(self, process_id: str, container_id: str, stdio: Stdio) -> None:
        self.id = process_id
        self.container_id = container_id
        self.stdio = stdio
        self.pid = 0
        self.state = State.CREATED
        self.exit_status = 0
        self.exited_at: float | None = None
        self.io: ProcessIO | None = None
        self.lock = threading.RLock()
        self._exited = threading.Event()

    @property
    def exec_id(self) -> str:
        return ""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the exit is fully handled (recorded, output drained, event published)."""
        return self._exited.wait(timeout)

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    def record_exit(self, exit_: Exit) -> None:
        """The reaper saw the process end: record it and let its output drain."""
        with self.lock:
            self.state = State.STOPPED
            self.exit_status = exit_.status
            self.exited_at = exit_.exited_at
        if self.io is not None and not self.io.wait(OUTPUT_DRAIN_TIMEOUT):
            log.warning(
                "output of %s/%s still open %.0fs after exit",
                self.container_id,
                self.id,
                OUTPUT_DRAIN_TIMEOUT,
            )

    def mark_exited(self) -> None:
        """Exit handling is complete (event published): release waiters."""
        self._exited.set()

    def resize(self, width: int, height: int) -> None:
        if self.io is None or not self.stdio.terminal:
            return  # like containerd's shim: resizing a process without a tty is a no-op
        self.io.resize(width, height)

    def close_stdin(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    def require_running(self, action: str) -> None:
        if self.state in (State.STOPPED, State.DELETED):
            raise not_found(f"process already finished: cannot {action}")


class InitProcess(Process):
    """The container's first process, created by ``runc create``."""

    def __init__(self, container_id: str, bundle: str, runc: Runc, stdio: Stdio) -> None:
        super().__init__(container_id, container_id, stdio)
        self.bundle = bundle
        self.runc = runc
        self.pid_file = os.path.join(bundle, "init.pid")

    def create(
        self,
        reaper: Reaper,
        make_io: Callable[[Stdio], ProcessIO],
        *,
        no_pivot: bool,
        no_new_keyring: bool,
        on_exit: Callable[[Process, Exit], None],
    ) -> None:
        io = self.io = make_io(self.stdio)
        since = time.time()
        try:
            self.runc.create(
                self.id,
                self.bundle,
                pid_file=self.pid_file,
                stdio=io.child_stdio(),
                console_socket=io.console_socket,
                no_pivot=no_pivot,
                no_new_keyring=no_new_keyring,
            )
            io.started()
            self.pid = read_pid_file(self.pid_file)
        except BaseException:
            io.close()
            raise
        reaper.watch(self.pid, since=since).add_callback(lambda e: on_exit(self, e))

    def start(self) -> None:
        with self.lock:
            if self.state != State.CREATED:
                raise failed_precondition(f"cannot start a {self.state.value} process")
            self.runc.start(self.id)
            # The process may already have exited (and been recorded) during start.
            if self.state == State.CREATED:
                self.state = State.RUNNING

    def kill(self, sig: int, all_processes: bool) -> None:
        with self.lock:
            if self.state in (State.STOPPED, State.DELETED) and not all_processes:
                raise not_found("process already finished")
            try:
                self.runc.kill(self.id, sig, all_processes=all_processes)
            except RuncError as exc:
                if "not running" in exc.message or "does not exist" in exc.message:
                    raise not_found(f"process already finished: {exc.message}") from None
                raise

    def pause(self) -> None:
        with self.lock:
            if self.state != State.RUNNING:
                raise failed_precondition(f"cannot pause a {self.state.value} process")
            self.state = State.PAUSING
            try:
                self.runc.pause(self.id)
            except BaseException:
                self.state = State.RUNNING
                raise
            self.state = State.PAUSED

    def resume(self) -> None:
        with self.lock:
            if self.state != State.PAUSED:
                raise failed_precondition(f"cannot resume a {self.state.value} process")
            self.runc.resume(self.id)
            self.state = State.RUNNING

    def delete(self) -> None:
        """Remove the runc container; the process must have stopped (or never started)."""
        with self.lock:
            if self.state in (State.RUNNING, State.PAUSED, State.PAUSING):
                raise failed_precondition(f"cannot delete a {self.state.value} process")
            if self.state == State.STOPPED:
                self.wait(OUTPUT_DRAIN_TIMEOUT + 1)
            try:
                self.runc.delete(self.id, force=self.state == State.CREATED)
            except RuncError as exc:
                if "does not exist" not in exc.message:
                    raise
            self.state = State.DELETED
            if self.io is not None:
                self.io.close()


class ExecProcess(Process):
    """An additional process run in the container with ``runc exec``."""

    def __init__(self, exec_id: str, init: InitProcess, spec: bytes, stdio: Stdio) -> None:
        super().__init__(exec_id, init.id, stdio)
        self.init = init
        self.spec = spec

    @property
    def exec_id(self) -> str:
        return self.id

    def start(
        self,
        reaper: Reaper,
        make_io: Callable[[Stdio], ProcessIO],
        on_exit: Callable[[Process, Exit], None],
    ) -> None:
        with self.lock:
            if self.state != State.CREATED:
                raise failed_precondition(f"cannot start a {self.state.value} exec process")
            bundle = self.init.bundle
            spec_path = os.path.join(bundle, f".exec-{self.id}.json")
            pid_file = os.path.join(bundle, f".exec-{self.id}.pid")
            process: dict[str, Any] = json.loads(self.spec)
            process["terminal"] = self.stdio.terminal
            with open(spec_path, "w") as f:
                json.dump(process, f)
            io = self.io = make_io(self.stdio)
            since = time.time()
            try:
                self.init.runc.exec(
                    self.init.id,
                    spec_path,
                    pid_file=pid_file,
                    stdio=io.child_stdio(),
                    console_socket=io.console_socket,
                )
                io.started()
                self.pid = read_pid_file(pid_file)
            except BaseException:
                io.close()
                raise
            finally:
                for path in (spec_path, pid_file):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            if self.state == State.CREATED:
                self.state = State.RUNNING
        reaper.watch(self.pid, since=since).add_callback(lambda e: on_exit(self, e))

    def kill(self, sig: int) -> None:
        with self.lock:
            if self.state != State.RUNNING or self.pid <= 0:
                raise not_found("process already finished")
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                raise not_found("process already finished") from None

    def delete(self) -> None:
        with self.lock:
            if self.state == State.RUNNING:
                raise failed_precondition("cannot delete a running exec process")
            if self.state == State.STOPPED:
                self.wait(OUTPUT_DRAIN_TIMEOUT + 1)
            self.state = State.DELETED
            if self.io is not None:
                self.io.close()


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
