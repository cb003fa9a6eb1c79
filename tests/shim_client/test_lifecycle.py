"""The whole task lifecycle through the shim client, against every shim we have.

Ours in v1 mode (listener on fd 3) and v2 mode (``start``/``delete`` commands),
ours in-process (``local``), and Debian's Go shims: ``containerd-shim`` (v1) and
``containerd-shim-runc-v2``. Nothing may be left behind afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from containerd_shim import client

from .helpers import (
    KINDS,
    REPO,
    BundleDir,
    assert_no_leaks,
    force_cleanup,
    lifecycle,
    shim_env,
    start_shim,
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_lifecycle(kind: str, bundle: BundleDir, namespace: str) -> None:
    cid = bundle.cid
    bundle.write_spec(["/bin/true"])  # the bundle must exist before the shim starts
    shim = start_shim(kind, bundle, cid, namespace)
    shim_pid = 0
    try:
        shim_pid = shim.shim_pid()
        assert shim_pid > 0 and shim_pid != os.getpid()
        assert shim.is_alive()
        if kind.endswith("v1"):
            assert shim.pid == shim_pid  # we started it
        lifecycle(shim, bundle, cid)
        shim.shutdown()
        assert not shim.is_alive(timeout=2)
    finally:
        shim.close()
        try:
            if shim_pid:
                assert_no_leaks(bundle, namespace, cid, shim_pid, shim.address)
        finally:
            force_cleanup(bundle, namespace, cid)


@pytest.mark.timeout(60)
def test_lifecycle_local(rootfs: Path, namespace: str) -> None:
    """``local()``: the same lifecycle with our v1 service in-process.

    The in-process shim makes its process a child subreaper, so it runs in a
    process of its own (tests/shim_client/local_child.py), not inside pytest.
    """
    res = subprocess.run(
        [sys.executable, "-m", "tests.shim_client.local_child", str(rootfs), namespace],
        cwd=REPO,
        env=shim_env(),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert res.returncode == 0, f"stdout: {res.stdout}\nstderr: {res.stderr}"
    assert res.stdout.strip().endswith("local lifecycle ok"), res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["py-v1", "go-v1"])
def test_connect_to_running_shim(kind: str, bundle: BundleDir, namespace: str) -> None:
    """A second client connects to a running v1 shim, sees its container, and stops it."""
    cid = bundle.cid
    bundle.write_spec(["/bin/sleep", "1000"])
    first = start_shim(kind, bundle, cid, namespace)
    shim_pid = first.pid
    try:
        pid = first.create(cid, bundle.bundle)
        first.start(cid)
        with client.connect(first.address, namespace=namespace) as second:
            assert second.shim_pid() == first.shim_pid()
            assert second.pid == 0  # not started by this client
            state = second.state(cid)
            assert (state.pid, state.status) == (pid, "running")
            second.kill(cid, 9)
            assert second.wait(cid, timeout=20).status == 137
            assert second.delete(cid).pid == pid
            shim_pid = second.shim_pid()
            second.stop_shim(timeout=10)
        # The starting client reaps the shim and removes its socket. (Ours exits 0 on
        # SIGTERM; Go's sometimes 1: its ttrpc server's Serve error after Shutdown is fatal.)
        status = first.wait_exit(timeout=10)
        assert status == 0 if kind == "py-v1" else status in (0, 1), status
        assert not first.is_alive(timeout=2)
    finally:
        first.close()
        try:
            assert_no_leaks(bundle, namespace, cid, shim_pid, first.address)
        finally:
            force_cleanup(bundle, namespace, cid)
