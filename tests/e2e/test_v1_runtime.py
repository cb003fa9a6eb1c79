"""containerd 1.6's v1 runtime (``io.containerd.runtime.v1.linux``) through a v1 shim.

A containerd of its own per shim, configured with
``[plugins."io.containerd.runtime.v1.linux"] shim = ...``: Debian's Go
``containerd-shim`` (the baseline, always) and ours (``containerd-shim-pyrunc-v1``,
with ``E2E_PYRUNC=1``). The same tests run against both.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import IMAGE_NAME, _prerequisites
from .containerd import (
    GO_V1_SHIM,
    V1_RUNTIME,
    Containerd,
    _flag_value,
    process_alive,
    wait_for,
)
from .harness import E2E, EventStream, Source, slug, wait_gone
from .images import build_oci_archive

SHIMS = ["go"] + (["pyrunc"] if os.environ.get("E2E_PYRUNC") == "1" else [])
SOURCES: list[Source] = ["image", "rootfs"]
TERMINABLE = ("/bin/sh", "-c", 'trap "exit 143" TERM; sleep 1000 & wait')


@pytest.fixture(scope="module", params=SHIMS)
def v1_containerd(
    request: pytest.FixtureRequest,
    namespace: str,
    rootfs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Containerd]:
    missing = _prerequisites()
    if missing:
        pytest.skip(missing)
    shim = GO_V1_SHIM if request.param == "go" else "pyrunc"
    # A namespace of its own: teardown removes whatever runc still has in it.
    cd = Containerd.create(f"{namespace}-v1{request.param}", v1_shim=shim)
    try:
        cd.start()
        archive = build_oci_archive(
            rootfs, tmp_path_factory.mktemp("v1image") / "i.tar", IMAGE_NAME
        )
        res = cd.ctr("images", "import", str(archive), timeout=60)
        assert res.returncode == 0, cd.explain(res, "image import failed")
        yield cd
    finally:
        cd.cleanup()


@pytest.fixture
def v1(v1_containerd: Containerd, rootfs: Path, request: pytest.FixtureRequest) -> Iterator[E2E]:
    if not v1_containerd.running:
        v1_containerd.restart()
    kind = "go" if request.node.callspec.params["v1_containerd"] == "go" else "py"
    name = request.node.originalname.removeprefix("test_")
    env = E2E(
        cd=v1_containerd,
        runtime=V1_RUNTIME,
        image=IMAGE_NAME,
        rootfs=rootfs,
        name=f"{slug(name, 16)}-v1{kind}",
    )
    try:
        yield env
    finally:
        env.cleanup()


def _bundle(cd: Containerd, cid: str) -> Path:
    return cd.state / V1_RUNTIME / cd.namespace / cid


def _shim_pid(cd: Containerd, cid: str) -> int:
    return int((_bundle(cd, cid) / "shim.pid").read_text())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_run_output_and_exit_code(v1: E2E, source: Source) -> None:
    run = v1.run_held("echo hello; echo oops >&2", exit_code=3, source=source)
    assert run.output() == b"hello\n", run.proc.describe()
    run.proc.wait_errors(b"oops\n", timeout=30)
    assert run.finish() == 3, run.proc.describe()
    assert run.cid not in v1.cd.tasks()


@pytest.mark.timeout(60)
def test_run_rm_quick_exit(v1: E2E) -> None:
    res = v1.run("/bin/sh", "-c", "exit 7", source="rootfs")
    assert res.returncode == 7, v1.cd.explain(res, "ctr run --rm")
    assert v1.containers() & set(v1.ids) == set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", SOURCES)
def test_detached_exec_kill_delete(v1: E2E, source: Source) -> None:
    cd = v1.cd
    cid = v1.start(*TERMINABLE, source=source)
    init_pid = cd.tasks()[cid].pid
    shim_pid = _shim_pid(cd, cid)
    assert process_alive(shim_pid)

    run = v1.exec_held(cid, "exec1", "echo exec-out; echo exec-err >&2", exit_code=5)
    assert run.output() == b"exec-out\n", run.proc.describe()
    run.proc.wait_errors(b"exec-err\n", timeout=30)
    res = cd.ctr("task", "ps", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task ps")
    pids = [int(line.split()[0]) for line in res.stdout.splitlines()[1:] if line.strip()]
    assert init_pid in pids, res.stdout
    assert run.finish() == 5, run.proc.describe()

    res = cd.ctr("task", "kill", "--signal", "SIGTERM", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill")
    cd.wait_status(cid, ("STOPPED",))
    v1.remove(cid, expect_exit=143)
    # containerd kills the v1 shim after Delete, and removes the bundle.
    wait_gone(cd, shim_pid)
    assert not _bundle(cd, cid).exists()


@pytest.mark.timeout(60)
def test_events_in_order(v1: E2E) -> None:
    events = EventStream(v1)
    res = v1.run("/bin/sh", "-c", "exit 4", source="rootfs")
    cid = v1.ids[-1]
    assert res.returncode == 4, v1.cd.explain(res, "ctr run --rm")
    events.sync()

    def topics() -> list[str] | None:
        found = [ev.topic for ev in events.task_events(cid)]
        return found if "/tasks/delete" in found else None

    seen = wait_for(
        lambda: t if (t := topics()) and "/tasks/exit" in t else None,
        timeout=15,
        what="the /tasks/exit and /tasks/delete events",
    )
    if v1.name.endswith("-v1py"):
        # Ours lets the exit event leave before Delete answers (containerd SIGKILLs the
        # shim right after it, then publishes /tasks/delete).
        assert seen == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], seen
    else:
        # Go's v1 shim publishes exits asynchronously: its exit may come after the delete.
        assert seen[:2] == ["/tasks/create", "/tasks/start"], seen
        assert sorted(seen[2:]) == ["/tasks/delete", "/tasks/exit"], seen
    exits = [ev.body for ev in events.task_events(cid) if ev.topic == "/tasks/exit"]
    assert exits[0].get("exit_status") == 4, exits


@pytest.mark.timeout(60)
def test_shim_contract(v1: E2E) -> None:
    """How containerd 1.6 starts a v1 shim: flags, cwd, socket, process group."""
    cd = v1.cd
    cid = v1.start(*TERMINABLE, source="rootfs")
    bundle = _bundle(cd, cid)
    shim_pid = _shim_pid(cd, cid)
    argv = Path(f"/proc/{shim_pid}/cmdline").read_bytes().decode().split("\0")
    assert _flag_value(argv, "-namespace") == cd.namespace, argv
    assert _flag_value(argv, "-workdir") == str(cd.root / V1_RUNTIME / cd.namespace / cid), argv
    assert _flag_value(argv, "-address") == cd.address, argv
    assert os.path.basename(_flag_value(argv, "-containerd-binary") or "") == "containerd", argv
    assert os.readlink(f"/proc/{shim_pid}/cwd") == str(bundle)
    assert os.getpgid(shim_pid) == shim_pid  # its own process group
    address = (bundle / "address").read_text()
    assert address.startswith("unix:///run/containerd/s/"), address  # a path, not abstract
    mode = os.stat(address.removeprefix("unix://")).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    fd3 = os.readlink(f"/proc/{shim_pid}/fd/3")
    assert fd3.startswith("socket:"), fd3
    res = cd.ctr("task", "kill", "--signal", "SIGKILL", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill")
    cd.wait_status(cid, ("STOPPED",))
    v1.remove(cid, expect_exit=137)
    wait_gone(cd, shim_pid)
    assert not os.path.exists(address.removeprefix("unix://"))


@pytest.mark.timeout(90)
def test_task_survives_containerd_restart(v1: E2E) -> None:
    """containerd reconnects to the running v1 shim (the bundle's ``address``)."""
    cd = v1.cd
    cid = v1.start(*TERMINABLE, source="rootfs")
    pid = cd.tasks()[cid].pid
    shim_pid = _shim_pid(cd, cid)
    cd.restart()
    task = cd.tasks()[cid]
    assert (task.pid, task.status) == (pid, "RUNNING")
    assert process_alive(shim_pid)
    run = v1.exec_held(cid, "after", "echo still-here", exit_code=2)
    assert run.output() == b"still-here\n", run.proc.describe()
    assert run.finish() == 2, run.proc.describe()
    res = cd.ctr("task", "kill", "--signal", "SIGTERM", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill")
    cd.wait_status(cid, ("STOPPED",))
    v1.remove(cid, expect_exit=143)
    wait_gone(cd, shim_pid)
