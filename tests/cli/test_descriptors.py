"""Service descriptions: built-in containerd services, --proto, --descriptor-set, list, describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from ttrpc.cli.builtin import BUILTIN_SERVICES, builtin_files
from ttrpc.cli.descriptors import Descriptors, split_method
from ttrpc.cli.errors import CliError

from .conftest import INTEROP_SERVICE, Cli

TASK_METHODS = [
    "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
    "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
]  # fmt: skip


def test_builtin_services(cli: Cli) -> None:
    res = cli("list")
    assert res.code == 0, res.err
    assert res.out.split() == list(BUILTIN_SERVICES)
    for service in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
        res = cli("list", service)
        assert res.out.split() == [f"{service}/{m}" for m in TASK_METHODS]
    res = cli("list", "containerd.runtime.linux.shim.v1.Shim")
    assert "containerd.runtime.linux.shim.v1.Shim/ShimInfo" in res.out.split()
    assert cli("list", "containerd.services.events.ttrpc.v1.Events").out == (
        "containerd.services.events.ttrpc.v1.Events/Forward\n"
    )


def test_task_v3_has_its_own_package() -> None:
    ref = Descriptors().find_method("containerd.task.v3.Task/State")
    assert ref.service == "containerd.task.v3.Task"
    assert ref.descriptor.input_type.full_name == "containerd.task.v3.StateRequest"
    assert ref.descriptor.output_type.full_name == "containerd.task.v3.StateResponse"
    v2 = Descriptors().find_method("containerd.task.v2.Task/State").descriptor.input_type
    v3 = ref.descriptor.input_type
    assert [(f.name, f.number, f.type) for f in v2.fields] == [
        (f.name, f.number, f.type) for f in v3.fields
    ]
    # Types from other packages are shared, not copied.
    create = Descriptors().find_method("containerd.task.v3.Task/Create").descriptor.input_type
    assert create.fields_by_name["rootfs"].message_type.full_name == "containerd.types.Mount"


def test_builtins_use_a_private_pool() -> None:
    names = [f.name for f in builtin_files()]
    assert "containerd_shim/api/runtime/task/v3/shim.proto" in names
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindServiceByName("containerd.task.v3.Task")


def test_builtin_descriptors_import_no_runtime_code() -> None:
    code = (
        "import sys\n"
        "from ttrpc.cli.descriptors import Descriptors\n"
        "Descriptors().find_method('containerd.task.v2.Task/State')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('containerd_shim'))\n"
        "bad = [m for m in loaded if not (m.endswith('_pb2') or m.count('.') < 2\n"
        "       or m.startswith('containerd_shim.api'))]\n"
        "print(bad, 'containerd_shim.api.runtime.v2.task.shim_pb2' in loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[] True"


def test_describe_method_shows_message_shapes(cli: Cli) -> None:
    res = cli("describe", "containerd.task.v2.Task/State")
    assert res.code == 0, res.err
    out = res.out
    assert out.startswith(
        "// containerd.task.v2.Task/State "
        "(containerd_shim/api/runtime/v2/task/shim.proto, built in)\n"
        "rpc State(containerd.task.v2.StateRequest) returns (containerd.task.v2.StateResponse);\n"
    )
    assert "message StateRequest {\n  string id = 1;\n  string exec_id = 2;\n}" in out
    assert "  containerd.v1.types.Status status = 4;\n" in out
    assert "  google.protobuf.Timestamp exited_at = 10;\n" in out
    assert "enum Status {\n  UNKNOWN = 0;\n  CREATED = 1;\n  RUNNING = 2;" in out
    assert "message Timestamp" not in out  # well-known types are not repeated


def test_describe_service_message_and_enum(cli: Cli) -> None:
    res = cli("describe", "containerd.task.v3.Task")
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[1] == "service Task {"
    assert (
        "  rpc Wait(containerd.task.v3.WaitRequest) returns (containerd.task.v3.WaitResponse);"
        in lines
    )
    res = cli("describe", "containerd.task.v2.CreateTaskRequest")
    assert "  repeated containerd.types.Mount rootfs = 3;\n" in res.out
    assert "message Mount {" in res.out  # used types follow
    res = cli("describe", ".containerd.v1.types.Status")
    assert res.out.splitlines()[1:3] == ["enum Status {", "  UNKNOWN = 0;"]
    res = cli("describe", "containerd.task.v2.Task.Kill")  # Service.Method works too
    assert "rpc Kill(containerd.task.v2.KillRequest) returns (google.protobuf.Empty);" in res.out
    res = cli("describe", "containerd.nothing.Here")
    assert (res.code, len(res.err_lines)) == (64, 1)
    everything = cli("describe").out
    assert everything.count("service ") == len(BUILTIN_SERVICES)


def test_describe_renders_maps_oneofs_optional_streams(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "shapes.proto").write_text(
        'syntax = "proto3";\npackage shapes.v1;\n'
        'import "google/protobuf/any.proto";\n'
        "message Thing {\n"
        "  map<string, Part> parts = 1;\n"
        "  oneof choice { string name = 2; int64 number = 3; }\n"
        "  optional bool flag = 4;\n"
        "  repeated google.protobuf.Any extra = 5;\n"
        "  message Part { Kind kind = 1; }\n"
        "  enum Kind { KIND_UNSPECIFIED = 0; KIND_BIG = 1; }\n"
        "}\n"
        "service Things { rpc Watch(Thing) returns (stream Thing); }\n"
    )
    res = cli("describe", "--proto", str(tmp_path / "shapes.proto"), "shapes.v1.Things/Watch")
    assert res.code == 0, res.err
    assert "rpc Watch(shapes.v1.Thing) returns (stream shapes.v1.Thing);" in res.out
    assert "// server-streaming" in res.out
    body = res.out[res.out.index("message Thing {") :]
    assert body == (
        "message Thing {\n"
        "  map<string, shapes.v1.Thing.Part> parts = 1;\n"
        "  oneof choice {\n"
        "    string name = 2;\n"
        "    int64 number = 3;\n"
        "  }\n"
        "  optional bool flag = 4;\n"
        "  repeated google.protobuf.Any extra = 5;\n"
        "  message Part {\n"
        "    shapes.v1.Thing.Kind kind = 1;\n"
        "  }\n"
        "  enum Kind {\n"
        "    KIND_UNSPECIFIED = 0;\n"
        "    KIND_BIG = 1;\n"
        "  }\n"
        "}\n"
    )


def test_descriptor_set_and_no_builtin(cli: Cli, interop_set: str) -> None:
    res = cli("list", "--descriptor-set", interop_set)
    assert res.out.split() == [INTEROP_SERVICE, *BUILTIN_SERVICES]
    res = cli("list", "--descriptor-set", interop_set, "--no-builtin")
    assert res.out.split() == [INTEROP_SERVICE]
    res = cli("list", "--no-builtin")
    assert (res.code, res.out) == (0, "")
    res = cli("call", "--no-builtin", "unix:///x", "containerd.task.v2.Task/State")
    assert res.code == 64


def test_bad_descriptor_sets(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff not protobuf")
    res = cli("list", "--descriptor-set", str(junk))
    assert res.code == 65
    assert res.err_lines == [
        f"ttrpc: {junk} is not a FileDescriptorSet (make one with protoc -o FILE --include_imports)"
    ]
    res = cli("list", "--descriptor-set", str(tmp_path / "absent.pb"))
    assert res.code == 66

    # A set built without --include_imports: well-known imports are found anyway,
    # others are named.
    file = descriptor_pb2.FileDescriptorProto(
        name="a.proto", package="a", syntax="proto3", dependency=["google/protobuf/empty.proto"]
    )
    service = file.service.add(name="A")
    service.method.add(
        name="Ping", input_type=".google.protobuf.Empty", output_type=".google.protobuf.Empty"
    )
    no_imports = tmp_path / "a.pb"
    no_imports.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    res = cli("list", "--descriptor-set", str(no_imports), "--no-builtin")
    assert (res.code, res.out) == (0, "a.A\n"), res.err
    file.dependency.append("b/missing.proto")
    no_imports.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    res = cli("list", "--descriptor-set", str(no_imports))
    assert res.code == 65
    assert res.err_lines == [
        f"ttrpc: {no_imports}: a.proto imports b/missing.proto, which is missing "
        "(build the set with --include_imports)"
    ]


def test_user_protos_may_reuse_containerd_names(cli: Cli, tmp_path: Path) -> None:
    """A user's pool is private: the same full names as the built-ins do not clash, and win."""
    (tmp_path / "mine.proto").write_text(
        'syntax = "proto3";\npackage containerd.task.v2;\n'
        "message StateRequest { string other = 1; }\n"
        "service Task { rpc State(StateRequest) returns (StateRequest); }\n"
    )
    descriptors = Descriptors([str(tmp_path / "mine.proto")])
    ref = descriptors.find_method("containerd.task.v2.Task/State")
    assert list(ref.descriptor.input_type.fields_by_name) == ["other"]
    assert not ref.source.builtin
    # Built-in services the user's files do not declare still resolve.
    assert descriptors.find_method("containerd.task.v3.Task/State").source.builtin
    assert (
        cli("list", "--proto", str(tmp_path / "mine.proto"))
        .out.split()
        .count("containerd.task.v2.Task")
        == 1
    )


def test_split_method() -> None:
    assert split_method("a.b.S/M") == ("a.b.S", "M")
    assert split_method("/a.b.S/M") == ("a.b.S", "M")
    assert split_method("a.b.S.M") == ("a.b.S", "M")
    for bad in ("M", "a.b.S/", "/M", "a/b/c"):
        with pytest.raises(CliError) as info:
            split_method(bad)
        assert info.value.exit_code == 64
