"""The shim client: start a shim, connect to one, or run one in-process; stop it.

This is what containerd's runtimes do with their shims, as a Python API
(blocking; :mod:`containerd_shim.client_aio` is the asyncio twin)::

    from containerd_shim import client
    from containerd_shim.v1 import ShimConfig

    shim = client.start(
        "containerd-shim-pyrunc-v1",            # or Go's "containerd-shim"
        "unix:///run/pyshim/c1.sock",          # we listen; the shim inherits it as fd 3
        "",                                    # containerd's address (events), if any
        config=ShimConfig(path=bundle, namespace="default", workdir=workdir),
        on_exit=lambda status: print("shim exited", status),
    )
    with shim:
        pid = shim.create("c1", bundle, client.IO(stdout=fifo))
        shim.start("c1")
        print(shim.wait("c1").status)
        shim.delete("c1")
        shim.shutdown()

- :func:`start` launches a **v1** shim (``containerd.runtime.linux.shim.v1.Shim``) the
  way containerd's v1 runtime does, :func:`connect` dials a running one and
  :func:`local` runs our v1 shim service in this process behind the same interface.
- :func:`start_v2` / :func:`connect_v2` / :func:`delete_v2` drive **v2** shims
  (``containerd.task.v2.Task``) through their ``start`` and ``delete`` commands.
- Every handle (:class:`Shim`) has the typed client as ``api`` and the same task
  operations whatever the protocol (``create``, ``start``, ``state``, ``pids``,
  ``exec``, ``kill``, ``wait``, ``delete``, ``close_io``, ``resize_pty``,
  ``shutdown``), plus ``is_alive``, ``stop_shim`` (SIGTERM) and ``kill_shim``
  (SIGKILL), which signal the pid the shim reports (never our own), and wait,
  within a deadline, until that process is gone.

Addresses are ``unix:///path`` (or a bare path) and ``unix://@name`` for an
abstract socket. Path sockets are created 0600. Abstract sockets have no
permissions (anybody may bind or connect to the name: CVE-2020-15257), so
they are used only when asked for, and then the client checks that the peer
runs as our own uid, as our shims (and Go's) check theirs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

import ttrpc.blocking
from containerd_shim.api.runtime.linux.runctypes.runc_pb2 import ProcessDetails
from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2 as v1api
from containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc import ShimBlockingClient
from containerd_shim.api.runtime.v2.task import shim_pb2 as v2api
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskBlockingClient
from containerd_shim.api.types.mount_pb2 import Mount
from containerd_shim.api.types.task.task_pb2 import Status as TaskStatus
from containerd_shim.v1 import ShimConfig
from ttrpc import Context, RpcError
from ttrpc.address import connect_socket, listen, parse_unix_address
from ttrpc.handshake import peer_credentials

if TYPE_CHECKING:
    from containerd_shim.local import LocalShim
    from containerd_shim.v1 import ShimV1Service

__all__ = [
    "DEFAULT_TIMEOUT",
    "IO",
    "OOM_SCORE_MAX_KILLABLE",
    "Exited",
    "Launch",
    "ProcessState",
    "Shim",
    "ShimConfig",
    "ShimError",
    "ShimV1",
    "ShimV2",
    "connect",
    "connect_v2",
    "delete_v2",
    "dial",
    "launch_v1",
    "local",
    "signal_shim",
    "start",
    "start_v2",
    "v1_argv",
]

DEFAULT_TIMEOUT = 10.0
# How long a task operation may take (runc create mounts and forks; Wait has none).
CALL_TIMEOUT = 60.0
# The lowest OOM score that leaves a process killable (containerd's sys.OOMScoreMaxKillable).
OOM_SCORE_MAX_KILLABLE = -999
# Longest unix socket path (sun_path is 108 bytes with the terminating NUL).
SOCKET_PATH_LIMIT = 107
NAMESPACE_KEY = "containerd-namespace-ttrpc"
PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
_STATUS_NAMES = {value: name.lower() for name, value in TaskStatus.items()}


_S = TypeVar("_S", bound="Shim")


class ShimError(Exception):
    """A shim could not be started, reached or stopped."""


@dataclass(frozen=True)
class IO:
    """A process's stdio as the shim gets it: fifo paths (or log URIs), and a tty flag."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class Exited:
    """How a process ended: containerd's exit status (128 + signal when killed)."""

    status: int
    exited_at: float | None
    pid: int = 0


@dataclass(frozen=True)
class ProcessState:
    """A process as the shim reports it; ``status``: created, running, stopped, paused ..."""

    id: str
    pid: int
    status: str
    exit_status: int
    exited_at: float | None
    bundle: str = ""
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def _seconds(stamp: Any) -> float | None:
    """A protobuf Timestamp as seconds, or None when unset (zero)."""
    nanos = int(stamp.ToNanoseconds())
    return nanos / 1e9 if nanos > 0 else None


def _argv(binary: str | Sequence[str]) -> list[str]:
    return [binary] if isinstance(binary, str) else list(binary)


# -- processes: signal and wait without waitpid ---------------------------------------------


def _wait_gone(pid: int, pidfd: int | None, deadline: float) -> bool:
    """Wait until ``pid`` has exited; False if ``deadline`` (monotonic) came first."""
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        remaining = max(0.0, deadline - time.monotonic())
        return bool(poller.poll(remaining * 1000))
    # No pidfds (Linux < 5.3): poll the pid, as Go's client does.
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def signal_shim(pid: int, sig: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Send ``sig`` to a shim and wait until it is gone.

    Never signals our own process (an in-process shim). A process that is
    already gone is fine. The shim may have been re-parented (so no waitpid):
    a pidfd says when it exits. Raises TimeoutError after ``timeout`` seconds.
    """
    if pid <= 0 or pid == os.getpid():
        return
    deadline = time.monotonic() + timeout
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    try:
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass  # exited already (perhaps not reaped yet): nothing to signal
        if not _wait_gone(pid, pidfd, deadline):
            raise TimeoutError(f"shim pid {pid} still running {timeout:.1f}s after signal {sig}")
    finally:
        if pidfd is not None:
            os.close(pidfd)


# -- sockets ------------------------------------------------------------------------------


def _target(address: str) -> str:
    target = parse_unix_address(address)
    if len(target.encode()) > SOCKET_PATH_LIMIT:
        raise ShimError(f"{address!r}: unix socket path too long (> {SOCKET_PATH_LIMIT})")
    return target


def _can_connect(target: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(2)
        try:
            s.connect(target)
        except OSError:
            return False
    return True


def _listen(address: str) -> tuple[socket.socket, str | None, int]:
    """Listen on ``address``: the socket, its file (None if abstract) and that file's inode."""
    target = _target(address)
    if target.startswith("\0"):
        return listen(address), None, 0
    os.makedirs(os.path.dirname(os.path.abspath(target)), mode=0o700, exist_ok=True)
    try:
        sock = listen(address, mode=0o600)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if _can_connect(target):
            raise ShimError(f"{address}: a shim already listens there") from None
        os.unlink(target)  # a stale socket nobody serves
        sock = listen(address, mode=0o600)
    return sock, target, os.stat(target).st_ino


def _remove_socket(path: str | None, inode: int) -> None:
    """Remove our socket file, unless somebody else's replaced it."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def dial(address: str, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A connected socket to a shim; for an abstract address, one that runs as our uid."""
    target = _target(address)
    sock = connect_socket(address, timeout)
    if target.startswith("\0"):
        peer = peer_credentials(sock)
        if peer is None or peer.uid != os.geteuid():
            sock.close()
            owner = "unknown" if peer is None else str(peer.uid)
            raise PermissionError(
                f"{address}: abstract socket served by uid {owner}, not ours ({os.geteuid()})"
            )
    return sock


def _write_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


# -- the shim's own output ----------------------------------------------------------------


class _Drain:
    """Reads what a shim writes to its log fifo, into ``sink`` (an fd) or nowhere.

    We hold the fifo open for reading and writing (containerd does the same), so
    the shim never blocks or gets EPIPE because of us, and reading stops at close().
    """

    def __init__(self, path: str, sink: int | None) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkfifo(path, 0o700)
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise ShimError(f"{path} exists and is not a fifo")
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.sink = sink
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="shim-log", daemon=True)
        self._thread.start()

    def writer(self) -> int:
        """A write end for the shim (blocking, close-on-exec: dup it onto the child's fd)."""
        return os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_r:
                    return
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                if self.sink is not None and data:
                    with contextlib.suppress(OSError):
                        os.write(self.sink, data)

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_w = -1


# -- launching a v1 shim ------------------------------------------------------------------


def v1_argv(
    binary: str | Sequence[str],
    daemon_address: str,
    config: ShimConfig,
    *,
    containerd_binary: str = "containerd",
    debug: bool = False,
) -> list[str]:
    """The command line of a v1 shim, as containerd's v1 runtime builds it."""
    argv = [
        *_argv(binary),
        "-namespace",
        config.namespace,
        "-workdir",
        config.workdir,
        "-address",
        daemon_address,
        "-containerd-binary",
        containerd_binary,
    ]
    if config.criu:
        argv += ["-criu-path", config.criu]
    if config.runtime_root:
        argv += ["-runtime-root", config.runtime_root]
    if config.systemd_cgroup:
        argv.append("-systemd-cgroup")
    if debug:
        argv.append("-debug")
    return argv


class Launch:
    """A v1 shim we spawned: its pid, and what to clean up once it has exited."""

    def __init__(self, pid: int, socket_path: str | None, inode: int, drains: list[_Drain]):
        self.pid = pid
        self._socket_path = socket_path
        self._inode = inode
        self._drains = drains
        self.status: int | None = None
        self.done = threading.Event()

    def exited(self, wait_status: int) -> int:
        """The shim was reaped: release its log fifos and socket file; its exit status."""
        from containerd_shim.reaper import exit_status

        self.status = exit_status(wait_status)
        for drain in self._drains:
            drain.close()
        _remove_socket(self._socket_path, self._inode)
        self.done.set()
        return self.status

    def kill(self) -> None:
        """SIGKILL the shim (still our unreaped child: its pid cannot have been reused)."""
        if not self.done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _spawn(
    argv: list[str], *, cwd: str, fds: Mapping[int, int], new_ns: bool, env: dict[str, str]
) -> int:
    """Spawn ``argv`` in ``cwd``, its own process group and (``new_ns``) mount namespace.

    util-linux ``unshare`` does the chdir and the unshare, then execs the shim
    (same pid): posix_spawn has neither, and forking a threaded Python is unsafe.
    """
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    trampoline = [unshare, f"--wd={cwd}"]
    if new_ns:
        trampoline += ["--mount", "--propagation=unchanged"]
    actions = [(os.POSIX_SPAWN_DUP2, fd, child) for child, fd in sorted(fds.items())]
    return os.posix_spawn(
        unshare,
        [*trampoline, "--", *argv],
        env,
        file_actions=actions,
        setpgroup=0,
        setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def launch_v1(
    binary: str | Sequence[str],
    address: str,
    daemon_address: str,
    *,
    config: ShimConfig,
    containerd_binary: str = "containerd",
    cgroup: str = "",
    no_new_ns: bool = False,
    debug: bool = False,
    oom_score: int | None = OOM_SCORE_MAX_KILLABLE,
    env: Mapping[str, str] | None = None,
) -> Launch:
    """Listen on ``address`` and spawn a v1 shim on it (no connection, nobody reaping it).

    The building block of :func:`start` (and of the asyncio ``start``), which
    then watch the shim's exit and connect. On failure, nothing is left behind.
    """
    if not config.namespace:
        raise ShimError("shim namespace cannot be empty")
    if not os.path.isdir(config.path):
        raise ShimError(f"bundle {config.path!r} is not a directory")
    program = _argv(binary)[0]
    if shutil.which(program) is None:
        raise ShimError(f"{program}: shim binary not found (or not executable)")
    argv = v1_argv(binary, daemon_address, config, containerd_binary=containerd_binary, debug=debug)
    listener, path, inode = _listen(address)
    drains: list[_Drain] = []
    opened: list[int] = []
    pid = 0
    try:
        out = err = -1
        if config.workdir:
            # As containerd: fifos in the work dir, drained (shown when debugging).
            os.makedirs(config.workdir, mode=0o711, exist_ok=True)
            for name, sink in (("shim.stdout.log", 1), ("shim.stderr.log", 2)):
                drain = _Drain(os.path.join(config.workdir, name), sink if debug else None)
                drains.append(drain)
                opened.append(drain.writer())
            out, err = opened
        elif debug:
            out, err = 1, 2
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(devnull)
        # Above the child's 0-3, so that no dup2 clobbers a source before it is used.
        sock_fd = _dup_above(listener.fileno())
        opened.append(sock_fd)
        fds = {0: devnull, 1: out if out >= 0 else devnull, 2: err if err >= 0 else devnull}
        fds[3] = sock_fd
        spawn_env = dict(os.environ if env is None else env)
        pid = _spawn(argv, cwd=config.path, fds=fds, new_ns=not no_new_ns, env=spawn_env)
    except BaseException:
        for drain in drains:
            drain.close()
        _remove_socket(path, inode)
        raise
    finally:
        for fd in opened:
            os.close(fd)
        listener.close()  # the shim has its copy
    launch = Launch(pid, path, inode, drains)
    try:
        _write_atomic(os.path.join(config.path, "address"), address)
        _write_atomic(os.path.join(config.path, "shim.pid"), str(pid))
        if cgroup:
            from containerd_shim.cgroupfs import add_process_to_cgroup

            add_process_to_cgroup(cgroup, pid)
        if oom_score is not None:
            set_oom_score(pid, oom_score)
    except BaseException:
        launch.kill()
        _, wait_status = os.waitpid(pid, 0)
        launch.exited(wait_status)
        raise
    return launch


def set_oom_score(pid: int, score: int) -> None:
    """Set a process's ``oom_score_adj``.

    Lowering it needs CAP_SYS_RESOURCE: without it (unprivileged, or a container
    that drops it) the shim keeps the score it inherited, as Go's sys.SetOOMScore
    does for unprivileged callers.
    """
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except PermissionError:
        pass


def _dup_above(fd: int, lowest: int = 10) -> int:
    """A close-on-exec duplicate of ``fd`` numbered ``lowest`` or more."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


# -- handles ------------------------------------------------------------------------------


class Shim:
    """A shim we can talk to: its typed client (``api``) and protocol-neutral operations."""

    address: str
    namespace: str

    def __init__(
        self,
        *,
        address: str,
        namespace: str,
        conn: ttrpc.blocking.Client | None,
        launch: Launch | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self._conn = conn
        self._launch = launch
        self.call_timeout = CALL_TIMEOUT

    @property
    def pid(self) -> int:
        """The pid of the shim process we started (0 when we did not start it)."""
        return self._launch.pid if self._launch is not None else 0

    def _ctx(self, timeout: float | None = -1.0) -> Context:
        """A call context: ``timeout`` seconds (-1: the call timeout; None: no deadline)."""
        if timeout is not None and timeout < 0:
            timeout = self.call_timeout
        return Context(timeout=timeout, metadata={NAMESPACE_KEY: self.namespace})

    # -- the shim process -------------------------------------------------

    def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The shim's pid, as it reports it."""
        raise NotImplementedError

    def is_alive(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Whether the shim answers (a False does not prove the process is gone)."""
        try:
            self.shim_pid(timeout)
        except (RpcError, OSError):
            return False
        return True

    def _signal(self, sig: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            pid = self.shim_pid(timeout)
        except (RpcError, OSError):
            if not self.pid:
                raise
            pid = self.pid  # it no longer answers, but we know its pid
        signal_shim(pid, sig, max(0.0, deadline - time.monotonic()))
        launch = self._launch
        # Ours: also wait until it is reaped and its socket removed.
        if (
            launch is not None
            and pid == launch.pid
            and not launch.done.wait(max(0.0, deadline - time.monotonic()))
        ):
            raise TimeoutError(f"shim pid {pid} not reaped within {timeout:.1f}s")

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """For a shim we started: wait until it has exited and been cleaned up after
        (reaped, socket file removed); its exit status, or None if ``timeout`` came first."""
        if self._launch is None:
            raise ShimError("this client did not start the shim: it cannot wait for its exit")
        if not self._launch.done.wait(timeout):
            return None
        return self._launch.status

    def stop_shim(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM the shim and wait (at most ``timeout``) until it is gone."""
        self._signal(signal.SIGTERM, timeout)

    def kill_shim(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGKILL the shim and wait (at most ``timeout``) until it is gone."""
        self._signal(signal.SIGKILL, timeout)

    def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop the shim the way its protocol says, and wait until it is gone."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection (the shim keeps running)."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tasks ------------------------------------------------------------

    def create(
        self,
        container_id: str,
        bundle: str,
        io: IO = IO(),
        *,
        rootfs: Sequence[Mount] = (),
        options: AnyPb | None = None,
    ) -> int:
        """Create the container of ``bundle`` (not started); its init pid."""
        raise NotImplementedError

    def start(self, container_id: str, exec_id: str = "") -> int:
        """Start the container's init process, or an exec process; its pid."""
        raise NotImplementedError

    def state(self, container_id: str, exec_id: str = "") -> ProcessState:
        raise NotImplementedError

    def pids(self, container_id: str) -> list[tuple[int, str]]:
        """The container's processes: ``(pid, exec id)`` (the exec id empty for others)."""
        raise NotImplementedError

    def exec(
        self,
        container_id: str,
        exec_id: str,
        process: Mapping[str, Any],
        io: IO = IO(),
    ) -> None:
        """Add an exec process (``process``: an OCI process, see :mod:`containerd_shim.spec`)."""
        raise NotImplementedError

    def kill(
        self, container_id: str, sig: int, exec_id: str = "", *, all_processes: bool = False
    ) -> None:
        raise NotImplementedError

    def wait(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> Exited:
        """Block until the process has exited (at most ``timeout`` seconds)."""
        raise NotImplementedError

    def delete(self, container_id: str, exec_id: str = "") -> Exited:
        """Delete a stopped process (the container itself for its init process)."""
        raise NotImplementedError

    def close_io(self, container_id: str, exec_id: str = "") -> None:
        """Close the process's stdin (once the client's writers have gone)."""
        raise NotImplementedError

    def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        raise NotImplementedError


def _spec_any(process: Mapping[str, Any]) -> AnyPb:
    return AnyPb(type_url=PROCESS_SPEC_TYPE, value=json.dumps(process).encode())


def _pids(processes: Sequence[Any]) -> list[tuple[int, str]]:
    found = []
    for p in processes:
        exec_id = ""
        if p.HasField("info") and p.info.value:
            # runctypes.ProcessDetails and runc.v1 ProcessDetails are the same on the wire.
            exec_id = ProcessDetails.FromString(p.info.value).exec_id
        found.append((int(p.pid), exec_id))
    return found


class ShimV1(Shim):
    """A v1 shim (``containerd.runtime.linux.shim.v1.Shim``): over a socket, or in-process."""

    api: ShimBlockingClient | ShimV1Service

    def __init__(
        self,
        api: ShimBlockingClient | ShimV1Service,
        *,
        address: str,
        namespace: str = "",
        conn: ttrpc.blocking.Client | None = None,
        launch: Launch | None = None,
        local: LocalShim | None = None,
    ) -> None:
        super().__init__(address=address, namespace=namespace, conn=conn, launch=launch)
        self.api = api
        self._local = local

    def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return int(self.api.ShimInfo(Empty(), self._ctx(timeout)).shim_pid)

    def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM: the shim kills and deletes its container, then exits.

        In-process: stop the container and the service.
        """
        if self._local is not None:
            self._local.close()
            return
        self.stop_shim(timeout)

    def close(self) -> None:
        super().close()
        if self._local is not None:
            self._local.close()

    def _pid_of(self, container_id: str, exec_id: str) -> str:
        return exec_id or container_id

    def create(
        self,
        container_id: str,
        bundle: str,
        io: IO = IO(),
        *,
        rootfs: Sequence[Mount] = (),
        options: AnyPb | None = None,
        runtime: str = "",
    ) -> int:
        request = v1api.CreateTaskRequest(
            id=container_id,
            bundle=bundle,
            runtime=runtime,
            rootfs=rootfs,
            terminal=io.terminal,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            options=options,
        )
        return int(self.api.Create(request, self._ctx()).pid)

    def start(self, container_id: str, exec_id: str = "") -> int:
        request = v1api.StartRequest(id=self._pid_of(container_id, exec_id))
        return int(self.api.Start(request, self._ctx()).pid)

    def state(self, container_id: str, exec_id: str = "") -> ProcessState:
        r = self.api.State(v1api.StateRequest(id=self._pid_of(container_id, exec_id)), self._ctx())
        return ProcessState(
            id=r.id,
            pid=r.pid,
            status=_STATUS_NAMES.get(r.status, "unknown"),
            exit_status=r.exit_status,
            exited_at=_seconds(r.exited_at),
            bundle=r.bundle,
            stdin=r.stdin,
            stdout=r.stdout,
            stderr=r.stderr,
            terminal=r.terminal,
        )

    def pids(self, container_id: str) -> list[tuple[int, str]]:
        r = self.api.ListPids(v1api.ListPidsRequest(id=container_id), self._ctx())
        # v1 shims label the init process with the container's id.
        return [(pid, "" if e == container_id else e) for pid, e in _pids(r.processes)]

    def exec(
        self,
        container_id: str,
        exec_id: str,
        process: Mapping[str, Any],
        io: IO = IO(),
    ) -> None:
        request = v1api.ExecProcessRequest(
            id=exec_id,
            terminal=io.terminal,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            spec=_spec_any(process),
        )
        self.api.Exec(request, self._ctx())

    def kill(
        self, container_id: str, sig: int, exec_id: str = "", *, all_processes: bool = False
    ) -> None:
        request = v1api.KillRequest(
            id=self._pid_of(container_id, exec_id), signal=sig, all=all_processes
        )
        self.api.Kill(request, self._ctx())

    def wait(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> Exited:
        request = v1api.WaitRequest(id=self._pid_of(container_id, exec_id))
        r = self.api.Wait(request, self._ctx(timeout))
        return Exited(r.exit_status, _seconds(r.exited_at))

    def delete(self, container_id: str, exec_id: str = "") -> Exited:
        if exec_id:
            r = self.api.DeleteProcess(v1api.DeleteProcessRequest(id=exec_id), self._ctx())
        else:
            r = self.api.Delete(Empty(), self._ctx())
        return Exited(r.exit_status, _seconds(r.exited_at), r.pid)

    def close_io(self, container_id: str, exec_id: str = "") -> None:
        request = v1api.CloseIORequest(id=self._pid_of(container_id, exec_id), stdin=True)
        self.api.CloseIO(request, self._ctx())

    def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        request = v1api.ResizePtyRequest(
            id=self._pid_of(container_id, exec_id), width=width, height=height
        )
        self.api.ResizePty(request, self._ctx())


class ShimV2(Shim):
    """A v2 shim (``containerd.task.v2.Task``), started with its ``start`` command."""

    api: TaskBlockingClient

    def __init__(
        self,
        api: TaskBlockingClient,
        *,
        address: str,
        namespace: str,
        container_id: str,
        conn: ttrpc.blocking.Client | None = None,
        log: _Drain | None = None,
    ) -> None:
        super().__init__(address=address, namespace=namespace, conn=conn)
        self.api = api
        self.container_id = container_id
        self._log = log

    def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        request = v2api.ConnectRequest(id=self.container_id)
        return int(self.api.Connect(request, self._ctx(timeout)).shim_pid)

    def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``Shutdown`` (the shim exits once it has no containers), then wait until it is gone."""
        deadline = time.monotonic() + timeout
        pid = self.shim_pid(timeout)
        try:
            self.api.Shutdown(v2api.ShutdownRequest(id=self.container_id), self._ctx(timeout))
        except RpcError as exc:
            if not isinstance(exc, ttrpc.ConnectionClosed):
                raise  # the shim may exit before it answers: that is success
        remaining = max(0.0, deadline - time.monotonic())
        pidfd = None
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(pid)
        if pidfd is None:
            return
        try:
            if not _wait_gone(pid, pidfd, time.monotonic() + remaining):
                raise TimeoutError(f"shim pid {pid} still running {timeout:.1f}s after Shutdown")
        finally:
            os.close(pidfd)

    def close(self) -> None:
        super().close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def create(
        self,
        container_id: str,
        bundle: str,
        io: IO = IO(),
        *,
        rootfs: Sequence[Mount] = (),
        options: AnyPb | None = None,
    ) -> int:
        request = v2api.CreateTaskRequest(
            id=container_id,
            bundle=bundle,
            rootfs=rootfs,
            terminal=io.terminal,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            options=options,
        )
        return int(self.api.Create(request, self._ctx()).pid)

    def start(self, container_id: str, exec_id: str = "") -> int:
        request = v2api.StartRequest(id=container_id, exec_id=exec_id)
        return int(self.api.Start(request, self._ctx()).pid)

    def state(self, container_id: str, exec_id: str = "") -> ProcessState:
        r = self.api.State(v2api.StateRequest(id=container_id, exec_id=exec_id), self._ctx())
        return ProcessState(
            id=r.id,
            pid=r.pid,
            status=_STATUS_NAMES.get(r.status, "unknown"),
            exit_status=r.exit_status,
            exited_at=_seconds(r.exited_at),
            bundle=r.bundle,
            stdin=r.stdin,
            stdout=r.stdout,
            stderr=r.stderr,
            terminal=r.terminal,
        )

    def pids(self, container_id: str) -> list[tuple[int, str]]:
        r = self.api.Pids(v2api.PidsRequest(id=container_id), self._ctx())
        return _pids(r.processes)

    def exec(
        self,
        container_id: str,
        exec_id: str,
        process: Mapping[str, Any],
        io: IO = IO(),
    ) -> None:
        request = v2api.ExecProcessRequest(
            id=container_id,
            exec_id=exec_id,
            terminal=io.terminal,
            stdin=io.stdin,
            stdout=io.stdout,
            stderr=io.stderr,
            spec=_spec_any(process),
        )
        self.api.Exec(request, self._ctx())

    def kill(
        self, container_id: str, sig: int, exec_id: str = "", *, all_processes: bool = False
    ) -> None:
        request = v2api.KillRequest(id=container_id, exec_id=exec_id, signal=sig, all=all_processes)
        self.api.Kill(request, self._ctx())

    def wait(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> Exited:
        request = v2api.WaitRequest(id=container_id, exec_id=exec_id)
        r = self.api.Wait(request, self._ctx(timeout))
        return Exited(r.exit_status, _seconds(r.exited_at))

    def delete(self, container_id: str, exec_id: str = "") -> Exited:
        r = self.api.Delete(v2api.DeleteRequest(id=container_id, exec_id=exec_id), self._ctx())
        return Exited(r.exit_status, _seconds(r.exited_at), r.pid)

    def close_io(self, container_id: str, exec_id: str = "") -> None:
        request = v2api.CloseIORequest(id=container_id, exec_id=exec_id, stdin=True)
        self.api.CloseIO(request, self._ctx())

    def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        request = v2api.ResizePtyRequest(
            id=container_id, exec_id=exec_id, width=width, height=height
        )
        self.api.ResizePty(request, self._ctx())


# -- v1: start, connect, local ------------------------------------------------------------


def start(
    binary: str | Sequence[str],
    address: str,
    daemon_address: str,
    *,
    config: ShimConfig,
    containerd_binary: str = "containerd",
    cgroup: str = "",
    no_new_ns: bool = False,
    debug: bool = False,
    on_exit: Callable[[int], object] | None = None,
    oom_score: int | None = OOM_SCORE_MAX_KILLABLE,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ShimV1:
    """Start a v1 shim and connect to it (containerd's ``WithStart``).

    Listens on ``address``, spawns ``binary`` (a path or an argv prefix) with the
    listener as fd 3 and the v1 flags (``daemon_address`` is containerd's, for
    events through ``containerd_binary publish``), in ``config.path``, in its own
    process group and, unless ``no_new_ns``, its own mount namespace. Writes
    ``address`` and ``shim.pid`` into ``config.path``, puts the shim in
    ``cgroup`` (if given), sets its OOM score, reaps it when it exits (then
    calls ``on_exit(exit_status)``, removes the socket file and stops reading its
    output), and connects. If anything fails after the spawn, the shim is killed.
    """
    launch = launch_v1(
        binary,
        address,
        daemon_address,
        config=config,
        containerd_binary=containerd_binary,
        cgroup=cgroup,
        no_new_ns=no_new_ns,
        debug=debug,
        oom_score=oom_score,
        env=env,
    )

    def reap() -> None:
        _, wait_status = os.waitpid(launch.pid, 0)
        status = launch.exited(wait_status)
        if on_exit is not None:
            try:
                on_exit(status)
            except Exception as exc:
                print(f"containerd_shim.client: on_exit failed: {exc!r}", file=sys.stderr)

    threading.Thread(target=reap, name=f"shim-{launch.pid}", daemon=True).start()
    try:
        shim = connect(address, timeout=timeout, namespace=config.namespace)
    except BaseException:
        launch.kill()
        launch.done.wait(timeout)
        raise
    shim._launch = launch
    return shim


def connect(
    address: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    namespace: str = "",
    on_close: Callable[[], object] | None = None,
) -> ShimV1:
    """Connect to a running v1 shim (containerd's ``WithConnect``)."""
    sock = dial(address, timeout)
    conn = ttrpc.blocking.connect(sock, on_close=on_close)
    return ShimV1(ShimBlockingClient(conn), address=address, namespace=namespace, conn=conn)


def local(config: ShimConfig, *, publish: Callable[[str, Message], object] | None = None) -> ShimV1:
    """Run our v1 shim service in this process, behind the same interface (no socket).

    ``publish(topic, event)`` receives its events. This process becomes a child
    subreaper (container processes are re-parented to it); exits are collected
    for the processes the shim started only (see :mod:`containerd_shim.local`).
    ``shutdown()`` or ``close()`` kills and deletes the container.
    """
    from containerd_shim.local import local_service

    shim_local = local_service(config, publish)
    return ShimV1(shim_local.service, address="", namespace=config.namespace, local=shim_local)


# -- v2: the start and delete commands ----------------------------------------------------


def _v2_command(
    binary: str | Sequence[str],
    *,
    namespace: str,
    containerd_address: str,
    publish_binary: str,
    args: Sequence[str],
) -> list[str]:
    return [
        *_argv(binary),
        "-namespace",
        namespace,
        "-address",
        containerd_address,
        "-publish-binary",
        publish_binary,
        *args,
    ]


def _v2_env(ttrpc_address: str, env: Mapping[str, str] | None) -> dict[str, str]:
    result = dict(os.environ if env is None else env)
    result["TTRPC_ADDRESS"] = ttrpc_address
    return result


def start_v2(
    binary: str | Sequence[str],
    *,
    container_id: str,
    bundle: str,
    namespace: str,
    containerd_address: str = "",
    ttrpc_address: str = "",
    publish_binary: str = "containerd",
    options: AnyPb | None = None,
    debug: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ShimV2:
    """Start a v2 shim for ``container_id`` with its ``start`` command, and connect.

    As containerd's runtime v2: ``BINARY -namespace NS -address A -publish-binary B
    -id ID [-debug] start`` in ``bundle``, with ``TTRPC_ADDRESS`` in the
    environment and ``options`` (an ``Any``) on stdin. The shim's log goes to
    the bundle's ``log`` fifo, which we create and drain (to our stderr when
    ``debug``). The shim daemonizes: it is not our child.
    """
    args = ["-id", container_id, *(["-debug"] if debug else []), "start"]
    argv = _v2_command(
        binary,
        namespace=namespace,
        containerd_address=containerd_address,
        publish_binary=publish_binary,
        args=args,
    )
    log = _Drain(os.path.join(bundle, "log"), 2 if debug else None)
    try:
        try:
            res = subprocess.run(
                argv,
                cwd=bundle,
                input=options.SerializeToString() if options is not None else b"",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_v2_env(ttrpc_address, env),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ShimError(f"{argv[0]} start: no address within {timeout:.0f}s") from None
        output = res.stdout.decode(errors="replace").strip()
        if res.returncode != 0:
            raise ShimError(f"{argv[0]} start failed (exit status {res.returncode}): {output}")
        address = output
        conn = ttrpc.blocking.connect(dial(address, timeout))
    except BaseException:
        log.close()
        raise
    return ShimV2(
        TaskBlockingClient(conn),
        address=address,
        namespace=namespace,
        container_id=container_id,
        conn=conn,
        log=log,
    )


def connect_v2(
    address: str, *, container_id: str, namespace: str, timeout: float = DEFAULT_TIMEOUT
) -> ShimV2:
    """Connect to a running v2 shim serving ``container_id``."""
    conn = ttrpc.blocking.connect(dial(address, timeout))
    return ShimV2(
        TaskBlockingClient(conn),
        address=address,
        namespace=namespace,
        container_id=container_id,
        conn=conn,
    )


def delete_v2(
    binary: str | Sequence[str],
    *,
    container_id: str,
    bundle: str,
    namespace: str,
    containerd_address: str = "",
    ttrpc_address: str = "",
    publish_binary: str = "containerd",
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Exited:
    """Clean up after a v2 shim that is gone: its ``delete`` command (runc delete, unmount)."""
    argv = _v2_command(
        binary,
        namespace=namespace,
        containerd_address=containerd_address,
        publish_binary=publish_binary,
        args=["-id", container_id, "-bundle", bundle, "delete"],
    )
    try:
        res = subprocess.run(
            argv,
            cwd=bundle,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_v2_env(ttrpc_address, env),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ShimError(f"{argv[0]} delete: still running after {timeout:.0f}s") from None
    if res.returncode != 0:
        message = res.stderr.decode(errors="replace").strip()
        raise ShimError(f"{argv[0]} delete failed (exit status {res.returncode}): {message}")
    r = v2api.DeleteResponse.FromString(res.stdout)
    # Go's shims leave the socket of a killed shim behind: remove it if nobody serves it.
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(bundle, "address")) as f:
            target = parse_unix_address(f.read().strip())
        if not target.startswith("\0") and not _can_connect(target):
            os.unlink(target)
    return Exited(r.exit_status, _seconds(r.exited_at), r.pid)
