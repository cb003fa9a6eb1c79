"""A thin wrapper over the runc command line: run it, parse what it prints, report its errors.

runc writes its errors as JSON lines to ``--log`` (its stderr may be the
container's), so failures are reported with runc's own last error message.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from typing import Any

from containerd_shim.reaper import Reaper

__all__ = ["DEFAULT_ROOT", "Runc", "RuncError"]

DEFAULT_ROOT = "/run/containerd/runc"

Stdio = tuple[int | None, int | None, int | None]


class RuncError(Exception):
    """runc failed; ``message`` is runc's own explanation when it gave one."""

    def __init__(self, command: str, status: int, message: str) -> None:
        super().__init__(f"runc {command} failed: {message or f'exit status {status}'}")
        self.command = command
        self.status = status
        self.message = message


class Runc:
    """runc, for one namespace's containers (state under ``root``)."""

    def __init__(
        self,
        reaper: Reaper,
        *,
        root: str,
        log_path: str,
        binary: str = "runc",
        systemd_cgroup: bool = False,
        criu: str = "",
        debug: bool = False,
    ) -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup
        self.criu = criu
        self.debug = debug

    def _argv(self, args: Sequence[str]) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", self.log_path, "--log-format", "json"]
        if self.debug:
            argv.append("--debug")
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if self.criu:
            argv += ["--criu", self.criu]
        argv += args
        return argv

    def run(self, *args: str, stdio: Stdio | None = None) -> bytes:
        """Run one runc command; return what it printed on stdout.

        With ``stdio`` the command's fds 0-2 are the container's (create, exec,
        run), so nothing is captured and errors come from the log alone.
        """
        command = args[0]
        log_offset = _size(self.log_path)
        stderr_fd = os.memfd_create("runc-stderr", os.MFD_CLOEXEC)
        try:
            if stdio is not None:
                watch = self.reaper.spawn(
                    self._argv(args), stdin=stdio[0], stdout=stdio[1], stderr=stdio[2]
                )
                out = b""
            else:
                read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
                try:
                    watch = self.reaper.spawn(self._argv(args), stdout=write_fd, stderr=stderr_fd)
                finally:
                    os.close(write_fd)
                with os.fdopen(read_fd, "rb") as pipe:
                    out = pipe.read()
            exit_ = watch.wait()
            assert exit_ is not None
            if exit_.status != 0:
                os.lseek(stderr_fd, 0, os.SEEK_SET)
                stderr = os.read(stderr_fd, 65536).decode(errors="replace").strip()
                message = _last_error(self.log_path, log_offset) or stderr
                raise RuncError(command, exit_.status, message)
            return out
        finally:
            os.close(stderr_fd)

    # -- lifecycle ------------------------------------------------------------

    def create(
        self,
        container_id: str,
        bundle: str,
        *,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        self.run(*args, container_id, stdio=stdio)

    def start(self, container_id: str) -> None:
        self.run("start", container_id)

    def exec(
        self,
        container_id: str,
        process_path: str,
        *,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
    ) -> None:
        args = ["exec", "--detach", "--process", process_path, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self.run(*args, container_id, stdio=stdio)

    def kill(self, container_id: str, sig: int, *, all_processes: bool = False) -> None:
        args = ["kill"]
        if all_processes:
            args.append("--all")
        self.run(*args, container_id, str(sig))

    def delete(self, container_id: str, *, force: bool = False) -> None:
        self.run("delete", *(["--force"] if force else []), container_id)

    def state(self, container_id: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run("state", container_id))
        return result

    def ps(self, container_id: str) -> list[int]:
        out = self.run("ps", "--format", "json", container_id)
        pids = json.loads(out) if out.strip() else []
        return [int(p) for p in pids or []]

    def pause(self, container_id: str) -> None:
        self.run("pause", container_id)

    def resume(self, container_id: str) -> None:
        self.run("resume", container_id)

    def update(self, container_id: str, resources_path: str) -> None:
        self.run("update", "--resources", resources_path, container_id)

    def checkpoint(
        self,
        container_id: str,
        *,
        image_path: str,
        work_path: str,
        exit_after: bool,
        options: Sequence[str] = (),
    ) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        if not exit_after:
            args.append("--leave-running")
        args += options
        self.run(*args, container_id)

    def events_stats(self, container_id: str) -> dict[str, Any]:
        """One ``runc events --stats`` sample (the cgroup statistics runc reads)."""
        result: dict[str, Any] = json.loads(self.run("events", "--stats", container_id))
        return result


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _last_error(log_path: str, offset: int) -> str:
    """The last error runc logged after ``offset``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return ""
    message = ""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message


def signal_number(value: int) -> int:
    """Validate a signal number from a request."""
    if not 0 < value < signal.NSIG:
        raise ValueError(f"invalid signal {value}")
    return value
