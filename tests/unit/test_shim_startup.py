"""The shim's lean ``start`` path and the zygote's building blocks (no containerd needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from containerd_shim import manager, zygote
from containerd_shim.api.runtime.v2.runc.options.oci_pb2 import Options

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
