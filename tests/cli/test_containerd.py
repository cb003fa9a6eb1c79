"""``ttrpc shims`` and ``ttrpc call`` against real shims under a private containerd.

Debian's Go shims (``io.containerd.runc.v2``, and the v1 ``containerd-shim`` through
``io.containerd.runtime.v1.linux``) always; ours (``io.containerd.pyrunc.v2``) with
``E2E_PYRUNC=1``, as in tests/e2e (``scripts/test`` sets it). Reuses tests/e2e's
private containerd and busybox rootfs; containers run detached from ``--rootfs``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.containerd import CONTAINERD, CTR, RUNC, Containerd, process_alive
from tests.e2e.images import BUSYBOX, build_rootfs

from .conftest import Cli

GO_V2 = "io.containerd.runc.v2"
GO_V1 = "io.containerd.runtime.v1.linux"
PY_V2 = "io.containerd.pyrunc.v2"
RUNTIMES = [GO_V2, GO_V1] + ([PY_V2] if os.environ.get("E2E_PYRUNC") == "1" else [])
V1_SHIM = shutil.which("containerd-shim") or "/usr/bin/containerd-shim"

TASK_V2 = "containerd.task.v2.Task"
SHIM_V1 = "containerd.runtime.linux.shim.v1.Shim"

pytestmark = pytest.mark.timeout(180)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for path in (CONTAINERD, CTR, RUNC, BUSYBOX):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not installed"
    return None


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    cd = Containerd.create(f"cli-{os.getpid()}")
    try:
        cd.start()
        yield cd
    finally:
        cd.cleanup()


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(params=RUNTIMES, ids=lambda r: r.split(".")[2])
def task(
    request: pytest.FixtureRequest, containerd: Containerd, rootfs: Path
) -> Iterator[tuple[str, str]]:
    """A detached container running ``sleep`` with the runtime: (runtime, container id)."""
    runtime = str(request.param)
    if runtime == GO_V1 and not os.path.exists(V1_SHIM):
        pytest.skip("containerd-shim (v1) not installed")
    cid = containerd.track(f"cli-{runtime.split('.')[2]}-{os.getpid()}")
    res = containerd.ctr(
        "run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "1000"
    )
    assert res.returncode == 0, containerd.explain(res, f"ctr run -d {cid} failed")
    try:
        containerd.wait_status(cid, ("RUNNING",))
        yield runtime, cid
    finally:
        containerd.force_remove(cid)


def _listed(cli: Cli, containerd: Containerd, cid: str) -> dict[str, object]:
    res = cli("shims", "--state", str(containerd.state), "-n", containerd.namespace, "-f", "json")
    assert res.code == 0, res.err
    found = [s for s in json.loads(res.out) if s["id"] == cid]
    assert len(found) == 1, res.out
    return dict(found[0])


def test_shims_lists_the_task(cli: Cli, containerd: Containerd, task: tuple[str, str]) -> None:
    runtime, cid = task
    pid = containerd.tasks()[cid].pid
    shim = _listed(cli, containerd, cid)
    assert shim["status"] == "RUNNING", shim
    assert shim["pid"] == pid
    assert shim["error"] is None
    assert shim["runtime"] == ("v1" if runtime == GO_V1 else "v2")
    assert isinstance(shim["shim_pid"], int) and process_alive(shim["shim_pid"])
    expected_binary = {
        GO_V2: "containerd-shim-runc-v2",
        GO_V1: "containerd-shim",
        PY_V2: "containerd-shim-pyrunc-v2",
    }[runtime]
    assert shim["shim"] == expected_binary
    assert str(shim["address"]).startswith("unix:///run/containerd/s/")

    # The table, read from containerd's config.toml this time.
    res = cli("shims", "--containerd-config", str(containerd.config_path))
    assert res.code == 0, res.err
    row = next(line.split() for line in res.out.splitlines() if f" {cid} " in line)
    assert row[0] == containerd.namespace
    assert row[3:7] == [expected_binary, str(shim["shim_pid"]), str(pid), "RUNNING"]


def test_call_state(cli: Cli, containerd: Containerd, task: tuple[str, str]) -> None:
    runtime, cid = task
    pid = containerd.tasks()[cid].pid
    address = str(_listed(cli, containerd, cid)["address"])
    service = SHIM_V1 if runtime == GO_V1 else TASK_V2
    ns = f"containerd-namespace-ttrpc={containerd.namespace}"
    res = cli("call", address, f"{service}/State", "-d", json.dumps({"id": cid}), "--metadata", ns)
    assert res.code == 0, res.err
    state = json.loads(res.out)
    assert (state["id"], state["pid"], state["status"]) == (cid, pid, "RUNNING")
    # Not exited yet: Go's zero time, from Go's shims and ours alike.
    assert state.get("exitedAt") == "0001-01-01T00:00:00Z", state
    assert state["bundle"].startswith(str(containerd.state))

    # No flags at all (containerd's namespace metadata is optional for the shims).
    res = cli("call", address, f"{service}/State", "-d", json.dumps({"id": cid}), "-f", "text")
    assert res.code == 0, res.err
    assert "status: RUNNING\n" in res.out

    pids_method = f"{SHIM_V1}/ListPids" if runtime == GO_V1 else f"{TASK_V2}/Pids"
    res = cli("call", address, pids_method, "-d", json.dumps({"id": cid}), "--compact")
    assert res.code == 0, res.err
    assert pid in [p["pid"] for p in json.loads(res.out)["processes"]]

    # A task the shim does not know: NOT_FOUND, one line, exit 5.
    res = cli("call", address, f"{service}/State", "-d", '{"id": "no-such-task"}')
    assert res.code == 5, res.err
    assert len(res.err_lines) == 1 and res.err.startswith("ttrpc: NOT_FOUND: "), res.err


def test_task_v3_and_connect(cli: Cli, containerd: Containerd, task: tuple[str, str]) -> None:
    runtime, cid = task
    shim = _listed(cli, containerd, cid)
    address = str(shim["address"])
    if runtime == GO_V1:
        # A v1 shim serves only containerd.runtime.linux.shim.v1.Shim: the task API is unknown.
        res = cli("call", address, f"{TASK_V2}/Connect", "-d", json.dumps({"id": cid}))
        assert (res.code, res.err_lines) == (
            12,
            [f"ttrpc: UNIMPLEMENTED: service {TASK_V2}"],
        ), res.err
        return
    res = cli("call", address, f"{TASK_V2}/Connect", "-d", json.dumps({"id": cid}), "--compact")
    assert res.code == 0, res.err
    connected = json.loads(res.out)
    assert (connected["shimPid"], connected["taskPid"]) == (shim["shim_pid"], shim["pid"])
    res = cli("call", address, "containerd.task.v3.Task/State", "-d", json.dumps({"id": cid}))
    if runtime == PY_V2:  # ours serves both names
        assert res.code == 0 and json.loads(res.out)["status"] == "RUNNING", res.err
    else:  # containerd 1.6's runc shim predates v3
        assert (res.code, res.err_lines) == (
            12,
            ["ttrpc: UNIMPLEMENTED: service containerd.task.v3.Task"],
        )
