"""``ttrpc shims`` against a fake containerd state directory served by fake shims of our own."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

import ttrpc
import ttrpc.blocking
from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2 as v1
from containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc import ShimBlockingService
from containerd_shim.api.runtime.v2.task import shim_pb2 as v2
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskBlockingService
from ttrpc.cli import shims
from ttrpc.cli.errors import CliError
from ttrpc.cli.options import NAMESPACE_KEY

from .conftest import Cli


class FakeTask(TaskBlockingService):
    """A v2 shim serving one task; records the namespace each call carried."""

    def __init__(self, task_id: str, pid: int, status: int) -> None:
        self.task_id, self.pid, self.status = task_id, pid, status
        self.namespaces: list[str | None] = []

    def Connect(
        self, request: v2.ConnectRequest, ctx: ttrpc.Context | None = None
    ) -> v2.ConnectResponse:
        assert ctx is not None
        self.namespaces.append(ctx.metadata.get_one(NAMESPACE_KEY))
        return v2.ConnectResponse(shim_pid=4242, task_pid=self.pid, version="fake")

    def State(self, request: v2.StateRequest, ctx: ttrpc.Context | None = None) -> v2.StateResponse:
        assert ctx is not None
        self.namespaces.append(ctx.metadata.get_one(NAMESPACE_KEY))
        if request.id != self.task_id:
            raise ttrpc.RpcError(ttrpc.Code.NOT_FOUND, f"container {request.id} not found")
        return v2.StateResponse(id=request.id, pid=self.pid, status=self.status)  # type: ignore[arg-type]


class FakeV1Shim(ShimBlockingService):
    def ShimInfo(self, request: Empty, ctx: ttrpc.Context | None = None) -> v1.ShimInfoResponse:
        return v1.ShimInfoResponse(shim_pid=777)

    def State(self, request: v1.StateRequest, ctx: ttrpc.Context | None = None) -> v1.StateResponse:
        return v1.StateResponse(id=request.id, pid=778, status=4)  # PAUSED


@pytest.fixture
def state(short_tmp: Path, tmp_path: Path) -> Iterator[tuple[Path, FakeTask]]:
    """A state dir: two namespaces of v2 bundles, one v1 bundle, and the odd cases."""
    root = tmp_path / "state"
    task = FakeTask("web", pid=1234, status=2)  # RUNNING
    servers = []
    address = f"unix://{short_tmp}/fake-v2-{os.getpid()}.sock"
    v1_address = f"unix://@ttrpc-cli-test-v1-{os.getpid()}"

    v2_server = ttrpc.blocking.Server()
    v2_server.register(task)
    v2_server.start(address)
    servers.append(v2_server)
    v1_server = ttrpc.blocking.Server()
    v1_server.register(FakeV1Shim())
    v1_server.start(v1_address)
    servers.append(v1_server)

    def bundle(runtime_dir: str, ns: str, cid: str, **files: str) -> None:
        path = root / runtime_dir / ns / cid
        path.mkdir(parents=True)
        for name, content in files.items():
            (path / name.replace("_", "-")).write_text(content)

    bundle(shims.V2_DIR, "default", "web", address=address,
           shim_binary_path="/usr/bin/containerd-shim-runc-v2")  # fmt: skip
    bundle(shims.V2_DIR, "default", "gone", address=f"unix://{short_tmp}/no-such.sock")
    bundle(shims.V2_DIR, "default", ".deleting", address=address)
    bundle(shims.V2_DIR, "k8s.io", "starting")  # no address file yet
    # containerd's v1 client: an address without unix:// is an abstract socket name.
    bundle(shims.V1_DIR, "legacy", "old", address=v1_address.removeprefix("unix://@"))
    try:
        yield root, task
    finally:
        for server in servers:
            server.close()


def test_discover_layout(state: tuple[Path, FakeTask]) -> None:
    root, _ = state
    found = shims.discover(str(root))
    assert [(s.namespace, s.id, s.runtime, s.shim) for s in found] == [
        ("default", "gone", "v2", ""),
        ("default", "web", "v2", "containerd-shim-runc-v2"),
        ("k8s.io", "starting", "v2", ""),
        ("legacy", "old", "v1", "containerd-shim"),
    ]
    assert found[3].address == f"unix://@ttrpc-cli-test-v1-{os.getpid()}"
    assert [s.id for s in shims.discover(str(root), "legacy")] == ["old"]


def test_table(cli: Cli, state: tuple[Path, FakeTask]) -> None:
    root, task = state
    res = cli("shims", "--state", str(root), "--timeout", "5s")
    assert res.code == 0, res.err
    rows = [line.split() for line in res.out.splitlines()]
    assert rows[0] == ["NAMESPACE", "ID", "API", "SHIM", "SHIM", "PID", "PID", "STATUS", "ADDRESS"]
    by_id = {row[1]: row for row in rows[1:]}
    assert by_id["web"][2:7] == ["v2", "containerd-shim-runc-v2", "4242", "1234", "RUNNING"]
    assert by_id["old"][2:7] == ["v1", "containerd-shim", "777", "778", "PAUSED"]
    assert by_id["gone"][3:7] == ["-", "-", "-", "UNREACHABLE"]
    assert by_id["starting"][6:] == ["UNREACHABLE", "-"]
    # Every call carried containerd's namespace.
    assert task.namespaces == ["default", "default"]
    # Failures: one line each on stderr.
    assert sorted(res.err_lines) == [
        f"ttrpc: default/gone: UNAVAILABLE: cannot connect to {by_id['gone'][7]}: "
        "No such file or directory",
        "ttrpc: k8s.io/starting: no address file in the bundle (the shim is not started)",
    ]


def test_json(cli: Cli, state: tuple[Path, FakeTask]) -> None:
    root, _ = state
    res = cli("shims", "--state", str(root), "-n", "default", "--format", "json")
    assert res.code == 0, res.err
    listed = json.loads(res.out)
    assert [s["id"] for s in listed] == ["gone", "web"]
    web = listed[1]
    assert web == {
        "namespace": "default",
        "id": "web",
        "runtime": "v2",
        "bundle": str(root / shims.V2_DIR / "default" / "web"),
        "address": web["address"],
        "shim": "containerd-shim-runc-v2",
        "shim_pid": 4242,
        "pid": 1234,
        "status": "RUNNING",
        "error": None,
    }
    assert listed[0]["status"] is None and listed[0]["error"].startswith("UNAVAILABLE: ")


def test_state_directory_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'version = 2\nroot = "/var/lib/x"\nstate = "/run/elsewhere" # comment\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  state = "not this"\n'
    )
    assert shims.state_dir("/given", str(config)) == "/given"
    assert shims.state_dir(None, str(config)) == "/run/elsewhere"
    assert shims._state_from_toml_text(config.read_text()) == "/run/elsewhere"
    assert shims._state_from_toml_text("[grpc]\nstate = 'no'\n") is None
    assert shims._state_from_toml_text("state = 'lit\\eral'\n") == "lit\\eral"
    assert shims._state_from_toml_text('state = "a\\u00e9"\n') == "aé"
    config.write_text("version = 2\n")
    assert shims.state_dir(None, str(config)) == shims.DEFAULT_STATE
    config.write_text("state = [oops\n")
    with pytest.raises(CliError) as info:
        shims.state_dir(None, str(config))
    assert info.value.exit_code == 65
    with pytest.raises(CliError) as info:
        shims.state_dir(None, str(tmp_path / "missing.toml"))
    assert info.value.exit_code == 66
    # Nothing given: /etc/containerd/config.toml if it says, else /run/containerd.
    monkeypatch.setattr(shims, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert shims.state_dir(None, None) == "/run/containerd"


def test_missing_state_directory(cli: Cli, tmp_path: Path) -> None:
    res = cli("shims", "--state", str(tmp_path / "nope"))
    assert res.code == 66
    assert res.err_lines == [
        f"ttrpc: no containerd state directory {tmp_path / 'nope'} "
        "(give --state DIR or --containerd-config FILE)"
    ]
    res = cli("shims", "--state", str(tmp_path))  # exists, but no runtime has run yet
    assert (res.code, res.out.split()[:2]) == (0, ["NAMESPACE", "ID"])
    assert len(res.out.splitlines()) == 1
