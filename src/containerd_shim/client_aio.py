"""The shim client for asyncio: start, connect to and stop shims without blocking the loop.

The asyncio twin of :mod:`containerd_shim.client`, thin over ``ttrpc.aio``: the
same launching code (:func:`containerd_shim.client.launch_v1`), the shim's exit
watched through a pidfd on the event loop, and the generated asyncio clients
as ``api`` (``ShimClient`` for v1 shims, ``TaskClient`` for v2)::

    shim = await client_aio.start(binary, "unix:///run/s.sock", "", config=config)
    info = await shim.api.ShimInfo(Empty())
    await shim.stop_shim()
    await shim.close()

The protocol-neutral task helpers (``create``, ``wait`` ...) are the blocking
client's; here the typed API is used directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty

import ttrpc.aio
from containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc import ShimClient
from containerd_shim.api.runtime.v2.task import shim_pb2 as v2api
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskClient
from containerd_shim.client import (
    DEFAULT_TIMEOUT,
    NAMESPACE_KEY,
    OOM_SCORE_MAX_KILLABLE,
    Launch,
    ShimError,
    _Drain,
    _target,
    _v2_command,
    _v2_env,
    launch_v1,
)
from containerd_shim.v1 import ShimConfig
from ttrpc import Context, RpcError
from ttrpc.handshake import peer_credentials

_S = TypeVar("_S", bound="AsyncShim")

__all__ = [
    "AsyncShim",
    "AsyncShimV1",
    "AsyncShimV2",
    "connect",
    "connect_v2",
    "signal_shim",
    "start",
    "start_v2",
]


async def _readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable (a pidfd: the process exited); False on timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, max(0.0, timeout))
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def signal_shim(pid: int, sig: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Send ``sig`` to a shim and wait until it is gone (see the blocking client's)."""
    if pid <= 0 or pid == os.getpid():
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
        if not await _readable(pidfd, timeout):
            raise TimeoutError(f"shim pid {pid} still running {timeout:.1f}s after signal {sig}")
    finally:
        os.close(pidfd)


async def _dial(address: str, timeout: float) -> socket.socket:
    target = _target(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
        if target.startswith("\0"):
            peer = peer_credentials(sock)
            if peer is None or peer.uid != os.geteuid():
                raise PermissionError(f"{address}: abstract socket not served by our uid")
    except BaseException:
        sock.close()
        raise
    return sock


class AsyncShim:
    """A shim we talk to from asyncio code."""

    def __init__(
        self,
        *,
        address: str,
        namespace: str,
        conn: ttrpc.aio.Client,
        launch: Launch | None = None,
        exited: asyncio.Event | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self._conn = conn
        self._launch = launch
        self._exited = exited

    @property
    def pid(self) -> int:
        """The pid of the shim process we started (0 when we did not start it)."""
        return self._launch.pid if self._launch is not None else 0

    def ctx(self, timeout: float | None = None) -> Context:
        """A call context carrying the namespace (v2 shims require it)."""
        return Context(timeout=timeout, metadata={NAMESPACE_KEY: self.namespace})

    async def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        raise NotImplementedError

    async def is_alive(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        try:
            await self.shim_pid(timeout)
        except (RpcError, OSError):
            return False
        return True

    async def _signal(self, sig: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            pid = await self.shim_pid(timeout)
        except (RpcError, OSError):
            if not self.pid:
                raise
            pid = self.pid
        await signal_shim(pid, sig, deadline - time.monotonic())
        if self._exited is not None and pid == self.pid:
            try:
                await asyncio.wait_for(self._exited.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise TimeoutError(f"shim pid {pid} not reaped within {timeout:.1f}s") from None

    async def stop_shim(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM the shim and wait (at most ``timeout``) until it is gone."""
        await self._signal(signal.SIGTERM, timeout)

    async def kill_shim(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGKILL the shim and wait (at most ``timeout``) until it is gone."""
        await self._signal(signal.SIGKILL, timeout)

    async def close(self) -> None:
        """Close the connection (the shim keeps running)."""
        await self._conn.close()

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncShimV1(AsyncShim):
    """A v1 shim; ``api`` is the generated asyncio ``ShimClient``."""

    def __init__(
        self,
        conn: ttrpc.aio.Client,
        *,
        address: str,
        namespace: str,
        launch: Launch | None = None,
        exited: asyncio.Event | None = None,
    ) -> None:
        super().__init__(
            address=address, namespace=namespace, conn=conn, launch=launch, exited=exited
        )
        self.api = ShimClient(conn)

    async def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return int((await self.api.ShimInfo(Empty(), self.ctx(timeout))).shim_pid)

    async def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM: the shim kills and deletes its container, then exits."""
        await self.stop_shim(timeout)


class AsyncShimV2(AsyncShim):
    """A v2 shim; ``api`` is the generated asyncio ``TaskClient``."""

    def __init__(
        self,
        conn: ttrpc.aio.Client,
        *,
        address: str,
        namespace: str,
        container_id: str,
        log: _Drain | None = None,
    ) -> None:
        super().__init__(address=address, namespace=namespace, conn=conn)
        self.api = TaskClient(conn)
        self.container_id = container_id
        self._log = log

    async def shim_pid(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        request = v2api.ConnectRequest(id=self.container_id)
        return int((await self.api.Connect(request, self.ctx(timeout))).shim_pid)

    async def shutdown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``Shutdown``, then wait until the shim is gone."""
        deadline = time.monotonic() + timeout
        pid = await self.shim_pid(timeout)
        with contextlib.suppress(ttrpc.ConnectionClosed):  # it may exit before it answers
            await self.api.Shutdown(v2api.ShutdownRequest(id=self.container_id), self.ctx(timeout))
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if not await _readable(pidfd, deadline - time.monotonic()):
                raise TimeoutError(f"shim pid {pid} still running {timeout:.1f}s after Shutdown")
        finally:
            os.close(pidfd)

    async def close(self) -> None:
        await super().close()
        if self._log is not None:
            self._log.close()
            self._log = None


async def connect(
    address: str, *, timeout: float = DEFAULT_TIMEOUT, namespace: str = ""
) -> AsyncShimV1:
    """Connect to a running v1 shim."""
    conn = await ttrpc.aio.connect(await _dial(address, timeout))
    return AsyncShimV1(conn, address=address, namespace=namespace)


async def start(
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
) -> AsyncShimV1:
    """Start a v1 shim and connect to it (see :func:`containerd_shim.client.start`).

    The shim's exit is noticed on the event loop (a pidfd), where it is reaped
    and ``on_exit(exit_status)`` is called.
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
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    pidfd = os.pidfd_open(launch.pid)  # our unreaped child: it exists

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _, wait_status = os.waitpid(launch.pid, 0)  # it exited: does not block
        status = launch.exited(wait_status)
        exited.set()
        if on_exit is not None:
            on_exit(status)

    loop.add_reader(pidfd, reap)
    try:
        conn = await ttrpc.aio.connect(await _dial(address, timeout))
    except BaseException:
        launch.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exited.wait(), timeout)
        raise
    return AsyncShimV1(
        conn, address=address, namespace=config.namespace, launch=launch, exited=exited
    )


async def start_v2(
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
) -> AsyncShimV2:
    """Start a v2 shim with its ``start`` command and connect (see the blocking ``start_v2``)."""
    argv = _v2_command(
        binary,
        namespace=namespace,
        containerd_address=containerd_address,
        publish_binary=publish_binary,
        args=["-id", container_id, *(["-debug"] if debug else []), "start"],
    )
    log = _Drain(os.path.join(bundle, "log"), 2 if debug else None)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=bundle,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_v2_env(ttrpc_address, env),
        )
        stdin = options.SerializeToString() if options is not None else b""
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise ShimError(f"{argv[0]} start: no address within {timeout:.0f}s") from None
        output = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise ShimError(f"{argv[0]} start failed (exit status {proc.returncode}): {output}")
        conn = await ttrpc.aio.connect(await _dial(output, timeout))
    except BaseException:
        log.close()
        raise
    return AsyncShimV2(
        conn, container_id=container_id, log=log, address=output, namespace=namespace
    )


async def connect_v2(
    address: str, *, container_id: str, namespace: str, timeout: float = DEFAULT_TIMEOUT
) -> AsyncShimV2:
    """Connect to a running v2 shim serving ``container_id``."""
    conn = await ttrpc.aio.connect(await _dial(address, timeout))
    return AsyncShimV2(conn, container_id=container_id, address=address, namespace=namespace)
