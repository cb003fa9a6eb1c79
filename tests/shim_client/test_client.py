"""The shim client's own contract: how it starts shims, stops them, and cleans up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

import ttrpc
from containerd_shim import client, client_aio

from .helpers import (
    GO_V2_SHIM,
    PY_V1_SHIM,
    PY_V2_SHIM,
    TRUE,
    BundleDir,
    assert_no_leaks,
    force_cleanup,
    new_id,
    pid_gone,
    shim_env,
    start_shim,
)

FAKE_SHIM = [sys.executable, str(Path(__file__).with_name("fake_shim.py"))]


def _config(b: BundleDir, namespace: str, **kwargs: object) -> client.ShimConfig:
    os.makedirs(b.bundle, exist_ok=True)
    return client.ShimConfig(path=b.bundle, namespace=namespace, workdir=b.work, **kwargs)  # type: ignore[arg-type]


def _start(b: BundleDir, namespace: str, address: str = "", **kwargs: object) -> client.ShimV1:
    config = kwargs.pop("config", None) or _config(b, namespace)
    return client.start(
        kwargs.pop("binary", PY_V1_SHIM),  # type: ignore[arg-type]
        address or f"unix://{b.tmp}/shim.sock",
        "",
        config=config,  # type: ignore[arg-type]
        containerd_binary=TRUE,
        env=shim_env(),
        **kwargs,  # type: ignore[arg-type]
    )


def _finish(shim: client.Shim) -> None:
    """Stop a shim a test started; kill it if that fails: nothing may outlive the test."""
    try:
        shim.stop_shim(timeout=10)
    except (TimeoutError, OSError, client.ShimError, ttrpc.RpcError):
        with contextlib.suppress(TimeoutError, OSError, client.ShimError, ttrpc.RpcError):
            shim.kill_shim(timeout=10)
    finally:
        shim.close()


def _cgroup_dirs(rel: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{rel}") if p.is_dir()]


@pytest.mark.timeout(30)
def test_start_spawns_as_containerd_does(bundle: BundleDir, namespace: str) -> None:
    cgroup = f"shimclient-{os.getpid()}/shim"
    config = _config(bundle, namespace, runtime_root="/run/containerd/runc", criu="/nonexistent")
    shim = _start(bundle, namespace, config=config, cgroup=f"/{cgroup}", oom_score=500, debug=True)
    try:
        pid = shim.pid
        assert pid == shim.shim_pid() == int(Path(bundle.bundle, "shim.pid").read_text())
        assert Path(bundle.bundle, "address").read_text() == shim.address
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        i = argv.index("-namespace")
        assert argv[i:] == [
            "-namespace", namespace, "-workdir", bundle.work, "-address", "",
            "-containerd-binary", TRUE, "-criu-path", "/nonexistent",
            "-runtime-root", "/run/containerd/runc", "-debug",
        ]  # fmt: skip
        assert os.readlink(f"/proc/{pid}/cwd") == bundle.bundle
        assert os.getpgid(pid) == pid  # its own process group
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
        sock = Path(bundle.tmp, "shim.sock")
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "500"
        assert f":/{cgroup}" in Path(f"/proc/{pid}/cgroup").read_text()
        # The shim's log goes to fifos in the work dir, as containerd arranges it.
        assert Path(bundle.work, "shim.stderr.log").is_fifo()
        shim.stop_shim()
        assert shim.wait_exit(5) == 0
        assert not sock.exists()
    finally:
        _finish(shim)
        for d in _cgroup_dirs(cgroup):
            d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()


@pytest.mark.timeout(30)
def test_no_new_ns_keeps_our_mount_namespace(bundle: BundleDir, namespace: str) -> None:
    shim = _start(bundle, namespace, no_new_ns=True)
    try:
        assert os.readlink(f"/proc/{shim.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    finally:
        _finish(shim)


@pytest.mark.timeout(30)
def test_failure_after_spawn_kills_the_shim(bundle: BundleDir, namespace: str) -> None:
    exits: list[int] = []
    with pytest.raises(OSError):
        _start(bundle, namespace, oom_score=5000, on_exit=exits.append)  # EINVAL
    pid = int(Path(bundle.bundle, "shim.pid").read_text())
    assert pid_gone(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert not Path(bundle.tmp, "shim.sock").exists()
    assert exits == []  # it never ran as a shim for anybody


@pytest.mark.timeout(30)
def test_kill_shim_calls_on_exit_and_cleans_up(bundle: BundleDir, namespace: str) -> None:
    exited = threading.Event()
    statuses: list[int] = []

    def on_exit(status: int) -> None:
        statuses.append(status)
        exited.set()

    shim = _start(bundle, namespace, on_exit=on_exit)
    try:
        pid = shim.pid
        shim.kill_shim(timeout=10)
        assert exited.wait(10)
        assert statuses == [128 + signal.SIGKILL]
        assert pid_gone(pid)
        assert not shim.is_alive(timeout=1)
        assert not Path(bundle.tmp, "shim.sock").exists()
        # Gone already: stopping again signals nothing and succeeds (ESRCH is fine).
        shim.stop_shim(timeout=2)
    finally:
        _finish(shim)


@pytest.mark.timeout(30)
def test_stop_shim_honours_its_deadline(bundle: BundleDir, namespace: str) -> None:
    shim = _start(bundle, namespace, binary=FAKE_SHIM)
    try:
        assert shim.is_alive()  # it answers: it ignores SIGTERM from now on
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            shim.stop_shim(timeout=0.5)  # the fake shim ignores SIGTERM
        assert 0.4 < time.monotonic() - start < 5
        assert shim.is_alive()
        shim.kill_shim(timeout=10)
        assert pid_gone(shim.pid)
    finally:
        _finish(shim)


def test_signal_shim_never_signals_us() -> None:
    client.signal_shim(os.getpid(), signal.SIGKILL)  # we are still here
    client.signal_shim(0, signal.SIGKILL)
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    client.signal_shim(proc.pid, signal.SIGKILL)  # reaped and gone: ESRCH is fine


@pytest.mark.timeout(30)
def test_abstract_address(bundle: BundleDir, namespace: str) -> None:
    address = f"unix://@shimclient-{os.getpid()}-{new_id()}"
    shim = _start(bundle, namespace, address=address)
    try:
        assert list(Path(bundle.tmp).glob("*.sock")) == []
        with client.connect(address, namespace=namespace) as again:
            assert again.shim_pid() == shim.pid
    finally:
        _finish(shim)


@pytest.mark.timeout(30)
def test_abstract_socket_of_another_user_is_refused() -> None:
    name = f"shimclient-{os.getpid()}-{new_id('other')}"
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.bind('\\0{name}'); s.listen()\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        with pytest.raises(PermissionError, match="uid 65534"):
            client.connect(f"unix://@{name}")
    finally:
        proc.communicate(timeout=10)


@pytest.mark.timeout(30)
def test_address_in_use(bundle: BundleDir, namespace: str) -> None:
    stale = Path(bundle.tmp, "shim.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody serves: replaced
    shim = _start(bundle, namespace)
    try:
        with pytest.raises(client.ShimError, match="already listens"):
            _start(bundle, namespace)
        assert shim.is_alive()
    finally:
        _finish(shim)


def test_connect_to_nothing(bundle: BundleDir) -> None:
    with pytest.raises(FileNotFoundError):
        client.connect(f"unix://{bundle.tmp}/nothing.sock", timeout=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["py-v2", "go-v2"])
def test_v2_delete_after_dead_shim(kind: str, bundle: BundleDir, namespace: str) -> None:
    """A SIGKILLed v2 shim leaves its container: the delete command removes it."""
    cid = bundle.cid
    bundle.write_spec(["/bin/sleep", "1000"])
    shim = start_shim(kind, bundle, cid, namespace)
    shim_pid = shim.shim_pid()
    try:
        pid = shim.create(cid, bundle.bundle)
        shim.start(cid)
        shim.kill_shim()
        assert not pid_gone(pid)  # the container outlives its shim
        exited = client.delete_v2(
            PY_V2_SHIM if kind == "py-v2" else GO_V2_SHIM,
            container_id=cid,
            bundle=bundle.bundle,
            namespace=namespace,
            containerd_address=f"{bundle.tmp}/containerd.sock",
            env=shim_env(),
        )
        assert exited.status == 128 + signal.SIGKILL
        assert pid_gone(pid)
    finally:
        shim.close()
        try:
            assert_no_leaks(bundle, namespace, cid, shim_pid, shim.address)
        finally:
            force_cleanup(bundle, namespace, cid)


@pytest.mark.timeout(30)
def test_aio_start_v1(bundle: BundleDir, namespace: str) -> None:
    async def scenario() -> list[int]:
        exits: list[int] = []
        shim = await client_aio.start(
            PY_V1_SHIM,
            f"unix://{bundle.tmp}/shim.sock",
            "",
            config=_config(bundle, namespace),
            containerd_binary=TRUE,
            env=shim_env(),
            on_exit=exits.append,
        )
        try:
            info = await shim.api.ShimInfo(Empty())
            assert info.shim_pid == shim.pid == await shim.shim_pid()
            assert await shim.is_alive()
            await shim.stop_shim(timeout=10)
            assert not await shim.is_alive(timeout=1)
        finally:
            if not pid_gone(shim.pid):
                await shim.kill_shim(timeout=10)
            await shim.close()
        return exits

    assert asyncio.run(scenario()) == [0]
    assert not Path(bundle.tmp, "shim.sock").exists()


@pytest.mark.timeout(30)
def test_aio_start_v2(bundle: BundleDir, namespace: str) -> None:
    cid = bundle.cid
    bundle.write_spec(["/bin/true"])

    async def scenario() -> int:
        shim = await client_aio.start_v2(
            PY_V2_SHIM,
            container_id=cid,
            bundle=bundle.bundle,
            namespace=namespace,
            containerd_address=f"{bundle.tmp}/containerd.sock",
            env=shim_env(),
        )
        async with shim:
            pid = await shim.shim_pid()
            await shim.shutdown(timeout=10)
        return pid

    pid = asyncio.run(scenario())
    assert pid_gone(pid)


def test_missing_binary_is_refused_before_listening(bundle: BundleDir, namespace: str) -> None:
    with pytest.raises(client.ShimError, match="not found"):
        _start(bundle, namespace, binary="/nonexistent/containerd-shim")
    assert not Path(bundle.tmp, "shim.sock").exists()
