"""Pieces of the v1 shim and the client that need no container."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from containerd_shim.api.events.task_pb2 import TaskExit
from containerd_shim.events import BinaryPublisher, Publisher
from containerd_shim.flags import parse
from containerd_shim.local import ScopedReaper
from containerd_shim.reaper import Reaper
from containerd_shim.spec import oci_spec, process_spec
from containerd_shim.v1 import ShimConfig, ShimV1Service


def test_v1_flags_as_containerd_passes_them() -> None:
    flags = parse(
        [
            "-namespace", "ns", "-workdir", "/w", "-address", "/run/c.sock",
            "-containerd-binary", "/usr/bin/containerd", "-criu-path", "/c",
            "-runtime-root", "/r", "-systemd-cgroup", "-debug",
        ]
    )  # fmt: skip
    assert (flags.namespace, flags.workdir, flags.address) == ("ns", "/w", "/run/c.sock")
    assert flags.containerd_binary == "/usr/bin/containerd"
    assert (flags.criu_path, flags.runtime_root) == ("/c", "/r")
    assert flags.systemd_cgroup and flags.debug and not flags.action
    assert parse(["-criu", "/x"]).criu_path == "/x"  # Go's v1 shim spells it -criu


def test_binary_publisher_runs_containerd_publish(tmp_path: Path) -> None:
    """Each event: BINARY --address A publish --topic T --namespace NS, the Any on stdin."""
    record = tmp_path / "published"
    fake = tmp_path / "containerd"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\ncat >> {record}.bin\n')
    fake.chmod(0o755)
    reaper = ScopedReaper()  # waits for its own children only: safe inside pytest
    reaper.start()
    publisher = BinaryPublisher(str(fake), "/run/c.sock", "ns1", reaper)
    try:
        event = TaskExit(container_id="c1", id="c1", pid=42, exit_status=3)
        publisher.publish("/tasks/exit", event)
        assert publisher.flush(10)
    finally:
        publisher.close(5)
        reaper.close()
    assert (
        record.read_text() == "--address /run/c.sock publish --topic /tasks/exit --namespace ns1\n"
    )
    from google.protobuf.any_pb2 import Any

    sent = Any.FromString(Path(f"{record}.bin").read_bytes())
    assert sent.type_url == "containerd.events.TaskExit"
    assert TaskExit.FromString(sent.value) == event


def test_no_containerd_no_events() -> None:
    publisher = Publisher("", "ns")  # a shim run by pyshim: nobody to tell
    publisher.publish("/tasks/exit", TaskExit(container_id="c"))
    assert publisher.flush(1)
    publisher.close(1)


def test_scoped_reaper_leaves_other_children_alone() -> None:
    reaper = ScopedReaper()
    reaper.start()
    try:
        other = subprocess.Popen(["/bin/sh", "-c", "exit 5"])
        ok = reaper.spawn(["/bin/sh", "-c", "exit 7"])
        killed = reaper.spawn(["/bin/sh", "-c", "kill -9 $$"])
        first, second = ok.wait(10), killed.wait(10)
        assert first is not None and first.status == 7
        assert second is not None and second.status == 128 + 9
        assert other.wait(10) == 5  # not stolen by the reaper
    finally:
        reaper.close()


def test_v1_service_before_create() -> None:
    """Requests before Create fail as Go's shim fails them; ShimInfo always answers."""
    from google.protobuf.empty_pb2 import Empty

    import ttrpc
    from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2

    service = ShimV1Service(
        ShimConfig(path="/nonexistent", namespace="ns"),
        reaper=Reaper(),
        publisher=Publisher("", "ns"),
        make_io=lambda *args: None,
    )
    assert service.ShimInfo(Empty()).shim_pid == os.getpid()
    with pytest.raises(ttrpc.RpcError) as info:
        service.State(shim_pb2.StateRequest(id="c1"))
    assert info.value.code == ttrpc.Code.FAILED_PRECONDITION
    with pytest.raises(ttrpc.RpcError) as info:
        service.Create(shim_pb2.CreateTaskRequest(id="../x", bundle="/nonexistent"))
    assert info.value.code == ttrpc.Code.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        ShimV1Service(
            ShimConfig(path="/", namespace=""),
            reaper=Reaper(),
            publisher=Publisher("", ""),
            make_io=lambda *args: None,
        )


def test_spec() -> None:
    spec = oci_spec("rel/rootfs", ["/bin/sh"], env=["A=1", "PATH=/bin"], terminal=True)
    assert spec["root"]["path"] == os.path.abspath("rel/rootfs")
    assert spec["process"]["env"] == ["PATH=/bin", "TERM=xterm", "A=1"]
    assert spec["process"]["terminal"] is True
    assert {"type": "pid"} in spec["linux"]["namespaces"]
    with pytest.raises(ValueError):
        process_spec([])
    with pytest.raises(ValueError):
        process_spec(["/bin/true"], env=["NOEQUALS"])


def test_console_scripts() -> None:
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("pyshim") == "containerd_shim.pyshim:main"
    assert scripts.get("containerd-shim-pyrunc-v1") == "containerd_shim.v1:main"
