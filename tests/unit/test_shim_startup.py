"""The shim's lean ``start`` path and the zygote's building blocks (no containerd needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from containerd_shim import launcher, manager, zygote
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options
from containerd_shim.api.runtime.v2.task.shim_pb2 import DeleteResponse
from containerd_shim.flags import parse
from containerd_shim.runc import DEFAULT_ROOT

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": SRC, **env}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_start_path_imports_no_protobuf_or_ttrpc() -> None:
    res = _python(
        "import sys\n"
        "import containerd_shim.__main__, containerd_shim.manager, containerd_shim.zygote\n"
        "from containerd_shim.zygote import socket_path\n"
        "socket_path()\n"
        "heavy = [m for m in sys.modules if m.startswith(('google', 'ttrpc'))]\n"
        "print(heavy)\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_start_path_stays_lean_without_site() -> None:
    """What ``start`` and ``delete`` import under the fast launcher: none of the
    modules that cost milliseconds each (json/re, socket/enum/selectors, typing,
    hashlib/OpenSSL, dataclasses/inspect, contextlib, importlib.util)."""
    code = (
        f"import sys; sys.path.append({SRC!r})\n"
        "before = set(sys.modules)\n"
        "import containerd_shim.__main__, containerd_shim.manager, containerd_shim.zygote\n"
        "containerd_shim.zygote.socket_path()\n"
        "containerd_shim.manager.socket_address('/run/c.sock', 'ns', 'id')\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    loaded = set(res.stdout.split())
    costly = {"json", "re", "socket", "enum", "selectors", "typing", "hashlib", "_hashlib"}
    costly |= {"dataclasses", "inspect", "contextlib", "importlib.util", "argparse", "shlex"}
    assert loaded & costly == set()
    assert {"containerd_shim.manager", "containerd_shim.zygote"} <= loaded


def test_zygote_request_encoding_round_trips() -> None:
    argv = ["/usr/bin/python3", "-m", "containerd_shim", "-id", "a b", "\udcff-not-utf8"]
    env = {"PATH": "/bin", "EMPTY": "", "EQ": "a=b=c"}
    payload = zygote.encode_request("serve", argv, env, "/run/x")
    assert zygote.decode_request(payload) == ("serve", argv, env, "/run/x")
    for bad in [b"", b"serve\0/", b"serve\0/\0x", b"serve\0/\x003\0a", b"serve\0/\x000\0NOEQUALS"]:
        with pytest.raises(ValueError):
            zygote.decode_request(bad)


def test_launchers_run_the_shims_without_site(tmp_path: Path) -> None:
    paths = launcher.install(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [launcher.NAME, launcher.NAME_V1]
    runtimes = ["io.containerd.pyrunc.v2", "io.containerd.runtime.v1.linux"]
    for path, runtime in zip(paths, runtimes, strict=True):
        assert os.stat(path).st_mode & 0o777 == 0o755
        text = Path(path).read_text()
        assert text.startswith(f"#!{sys.executable} -IS\n")  # no shell in between
        res = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[0] == f"{os.path.basename(path)}:"
        assert runtime in res.stdout


def test_launcher_for_a_python_no_shebang_can_name_runs_through_sh(tmp_path: Path) -> None:
    spaced = tmp_path / "a python" / "python3"
    spaced.parent.mkdir()
    spaced.symlink_to(sys.executable)
    binary = tmp_path / launcher.NAME
    binary.write_text(launcher.script(python=str(spaced), path_entry=SRC, env={"X_Y": "a b"}))
    binary.chmod(0o755)
    assert binary.read_text().startswith("#!/bin/sh\n")
    res = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "io.containerd.pyrunc.v2" in res.stdout


def test_v1_launcher_reaches_protobuf_without_site() -> None:
    """The v1 daemon needs protobuf: its launcher puts protobuf's directory on the path."""
    root = launcher._protobuf_root()
    assert json.dumps(root) in launcher.script(launcher.NAME_V1)
    assert json.dumps(root) not in launcher.script(launcher.NAME)
    code = f"import sys; sys.path += {[SRC, root]!r}; import containerd_shim.v1, google.protobuf"
    res = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("left_behind", [False, True])
def test_launcher_delete_without_a_zygote(tmp_path: Path, left_behind: bool) -> None:
    """Through the fast launcher with the zygote off: a container that left nothing
    is answered at once (no runc); one runc still knows needs protobuf and runc, so
    the ``-S`` interpreter re-executes itself as the full shim, which runs runc
    (whose log then appears in the bundle)."""
    from containerd_shim.containers import write_options

    path = launcher.script(path_entry=SRC, env={"PYTHONPATH": SRC})
    binary = tmp_path / "containerd-shim-pyrunc-v2"
    binary.write_text(path)
    binary.chmod(0o755)
    bundle = tmp_path / "ns" / "c1"
    bundle.mkdir(parents=True)
    root = tmp_path / "runc-root"
    write_options(str(bundle), Options(root=str(root)))
    if left_behind:
        (root / "ns" / "c1").mkdir(parents=True)
    argv = [str(binary), "-namespace", "ns", "-address", str(tmp_path / "c.sock"), "-id", "c1"]
    res = subprocess.run(
        [*argv, "delete"],
        cwd=bundle,
        env={**os.environ, "PYRUNC_ZYGOTE": "0"},
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    response = DeleteResponse.FromString(res.stdout)
    assert response.exit_status == 137 and response.exited_at.seconds > 0
    assert (bundle / "log.json").exists() == left_behind


@pytest.mark.parametrize("cgroup", ["", "/pyrunc/shims", "x" * 300])
def test_shim_cgroup_decoded_by_hand(cgroup: str) -> None:
    options = Options(shim_cgroup=cgroup, binary_name="runc", no_pivot_root=True, io_uid=7)
    packed = Any(type_url="containerd.runc.v1.Options", value=options.SerializeToString())
    any_ = manager._proto_fields(packed.SerializeToString())
    assert any_[1] == b"containerd.runc.v1.Options"
    assert manager._proto_fields(any_.get(2, b"")).get(3, b"").decode() == cgroup


def test_proto_fields_rejects_truncated_input() -> None:
    data = Any(type_url="containerd.runc.v1.Options", value=b"abc").SerializeToString()
    with pytest.raises(ValueError):
        manager._proto_fields(data[:-2])


def test_invalid_id_is_refused_without_the_api() -> None:
    with pytest.raises(SystemExit):
        manager._validate_id("../escape")
    manager._validate_id("ok.id-1")


def test_zygote_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRUNC_ZYGOTE", "0")
    assert not zygote.enabled()
    assert manager._fork_daemon(["/bin/true"], 0) is None
    monkeypatch.setenv("PYRUNC_ZYGOTE", "1")
    assert zygote.enabled()


def test_request_without_a_zygote_returns_none(tmp_path: Path) -> None:
    assert zygote.request(str(tmp_path / "nothing"), "serve", ["x"], [0]) is None


def test_socket_path_is_stable_and_per_code_version() -> None:
    path = zygote.socket_path()
    assert path == zygote.socket_path()
    assert path.startswith("/run/containerd/s/pyrunc-zygote-")


def test_set_cmdline_rewrites_proc_cmdline() -> None:
    res = _python(
        "import sys\n"
        "from containerd_shim.zygote import _argv_area, set_cmdline\n"
        "area = _argv_area()\n"
        "assert set_cmdline(['/usr/bin/shim', '-id', 'abc', '-namespace', 'ns'], area)\n"
        "assert not set_cmdline(['y' * 10000], area)\n"
        "raw = open('/proc/self/cmdline', 'rb').read()\n"
        "print(raw.rstrip(b'\\0').split(b'\\0'))\n",
        "-" * 512,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[b'/usr/bin/shim', b'-id', b'abc', b'-namespace', b'ns']"


@pytest.mark.parametrize(
    ("pid", "status", "when"),
    [(0, 137, 1_700_000_000.123456789), (4242, 0, 0.5), (2**32 - 1, 255, 1.0), (1, 137, 0.0)],
)
def test_delete_response_is_encoded_as_protobuf_would(pid: int, status: int, when: float) -> None:
    data = manager.delete_response(pid, status, when)
    parsed = DeleteResponse.FromString(data)
    assert (parsed.pid, parsed.exit_status) == (pid, status)
    assert parsed.exited_at.ToNanoseconds() == int(when * 1e9)
    expected = DeleteResponse(pid=pid, exit_status=status)
    expected.exited_at.FromNanoseconds(int(when * 1e9))
    assert data == expected.SerializeToString()


def _bundle(tmp_path: Path, options: Options | None) -> Path:
    from containerd_shim.containers import write_options

    bundle = tmp_path / "ns" / "c1"
    (bundle / "rootfs").mkdir(parents=True)
    if options is not None:
        write_options(str(bundle), options)
    (bundle / "init.pid").write_text("4321")
    return bundle


def _flags(bundle: Path) -> Any:
    return parse(
        [
            "-namespace",
            "ns",
            "-address",
            "/run/c.sock",
            "-id",
            "c1",
            "-bundle",
            str(bundle),
            "delete",
        ]
    )


def test_quick_delete_when_nothing_is_left(tmp_path: Path) -> None:
    root = tmp_path / "runc-root"
    bundle = _bundle(tmp_path, Options(root=str(root)))
    socket_path = tmp_path / "gone.sock"
    socket_path.write_text("")  # nothing listens there any more
    (bundle / "address").write_text(f"unix://{socket_path}")
    response = manager.quick_delete(_flags(bundle))
    assert response is not None
    parsed = DeleteResponse.FromString(response)
    assert (parsed.pid, parsed.exit_status) == (4321, 137)
    assert not socket_path.exists()


def test_quick_delete_defers_when_runc_still_has_the_container(tmp_path: Path) -> None:
    root = tmp_path / "runc-root"
    bundle = _bundle(tmp_path, Options(root=str(root)))
    (root / "ns" / "c1").mkdir(parents=True)
    assert manager.quick_delete(_flags(bundle)) is None


@pytest.mark.parametrize("root", ['with"quote', "back\\slash"])
def test_quick_delete_defers_when_options_are_unclear(tmp_path: Path, root: str) -> None:
    bundle = _bundle(tmp_path, Options(root=root))
    assert manager.quick_delete(_flags(bundle)) is None


def test_runc_root_read_without_json(tmp_path: Path) -> None:
    assert manager._runc_root(str(_bundle(tmp_path / "a", None))) == manager.RUNC_DEFAULT_ROOT
    assert manager._runc_root(str(_bundle(tmp_path / "b", Options()))) == manager.RUNC_DEFAULT_ROOT
    bundle = _bundle(tmp_path / "c", Options(root="/run/other root", binary_name="runc"))
    assert manager._runc_root(str(bundle)) == "/run/other root"
    assert manager.RUNC_DEFAULT_ROOT == DEFAULT_ROOT


def test_start_and_delete_can_run_on_another_interpreter(tmp_path: Path) -> None:
    """The v2 launcher may run ``start``/``delete`` on a faster-starting interpreter than
    the shim's: the script names the shim's for the zygote and daemons, and both find the
    same zygote socket."""
    from tests.e2e.containerd import shim_python

    shim = shim_python()
    text = launcher.script(python=shim, start_python=sys.executable, path_entry=SRC)
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert f"containerd_shim.python = {json.dumps(shim)}" in text
    binary = tmp_path / launcher.NAME
    binary.write_text(text)
    binary.chmod(0o755)
    res = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ask = "from containerd_shim import zygote; print(zygote.socket_path())"
    as_start = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path += [{SRC!r}]; import containerd_shim; "
         f"containerd_shim.python = {shim!r}; {ask}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    as_zygote = subprocess.run(
        [shim, "-I", "-S", "-c", f"import sys; sys.path += [{SRC!r}]; {ask}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert as_start.stdout == as_zygote.stdout
    # The v1 launcher is the daemon itself: always the shim's interpreter.
    v1 = launcher.script(launcher.NAME_V1, python=shim, start_python=sys.executable)
    assert v1.startswith(f"#!{shim} -IS\n")
