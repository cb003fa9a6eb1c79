"""Our containerd .proto files (proto/containerd_shim) against containerd's originals.

The originals come from Debian's Go source packages (under /usr/share/gocode/src).
They are compiled here with protoc into a FileDescriptorSet and compared with the
descriptors of our generated modules (src/containerd_shim/api): same packages,
messages, fields, enums, services and methods, in both directions. Go-only
decorations (gogoproto and fieldpath options, go_package) are not compared.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.message import Message

from containerd_shim.api.events import task_pb2 as events_pb2
from containerd_shim.api.runtime.v2.runc.options import oci_pb2
from containerd_shim.api.runtime.v2.task import shim_pb2
from containerd_shim.api.services.ttrpc.events.v1 import events_pb2 as envelope_pb2
from containerd_shim.api.types import mount_pb2
from containerd_shim.api.types.task import task_pb2

ROOT = Path(__file__).resolve().parents[2]
OURS_DIR = ROOT / "proto"
GOCODE = Path("/usr/share/gocode/src")
GOGO = GOCODE / "github.com/gogo/protobuf"
PROTOC_TIMEOUT = 30

# Original (relative to GOCODE) -> ours (relative to proto/). Keep in step with
# proto/containerd_shim/README.md.
MAPPING = {
    "github.com/containerd/containerd/api/types/mount.proto": (
        "containerd_shim/api/types/mount.proto"
    ),
    "github.com/containerd/containerd/api/types/metrics.proto": (
        "containerd_shim/api/types/metrics.proto"
    ),
    "github.com/containerd/containerd/api/types/task/task.proto": (
        "containerd_shim/api/types/task/task.proto"
    ),
    "github.com/containerd/containerd/api/events/task.proto": (
        "containerd_shim/api/events/task.proto"
    ),
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto": (
        "containerd_shim/api/services/ttrpc/events/v1/events.proto"
    ),
    "github.com/containerd/containerd/runtime/v2/task/shim.proto": (
        "containerd_shim/api/runtime/v2/task/shim.proto"
    ),
    "github.com/containerd/containerd/runtime/v2/runc/options/oci.proto": (
        "containerd_shim/api/runtime/v2/runc/options/oci.proto"
    ),
    "github.com/containerd/containerd/runtime/linux/runctypes/runc.proto": (
        "containerd_shim/api/runtime/linux/runctypes/runc.proto"
    ),
    "github.com/containerd/containerd/runtime/v1/shim/v1/shim.proto": (
        "containerd_shim/api/runtime/v1/shim/v1/shim.proto"
    ),
    "github.com/containerd/cgroups/stats/v1/metrics.proto": (
        "containerd_shim/api/cgroups/stats/v1/metrics.proto"
    ),
    "github.com/containerd/cgroups/v2/stats/metrics.proto": (
        "containerd_shim/api/cgroups/v2/stats/metrics.proto"
    ),
}
# Imports that only carry Go code generation options; ours have no counterpart.
GO_ONLY_IMPORTS = {
    "gogoproto/gogo.proto",
    "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto",
}
# Files the originals need besides themselves, and the Debian package of each tree.
SUPPORT_FILES = [
    GOGO / "gogoproto/gogo.proto",
    GOCODE / "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto",
]
DEBIAN_PACKAGES = {
    "github.com/containerd/containerd/": "golang-github-containerd-containerd-dev",
    "github.com/containerd/cgroups/": "golang-github-containerd-cgroups-dev",
    "github.com/gogo/protobuf/": "golang-github-gogo-protobuf-dev",
}


def _debian_package(path: Path) -> str:
    relative = path.relative_to(GOCODE).as_posix()
    for prefix, package in DEBIAN_PACKAGES.items():
        if relative.startswith(prefix):
            return package
    raise AssertionError(f"no Debian package known for {path}")


def _test_id(original: str) -> str:
    return original.removeprefix("github.com/containerd/")


# -- compiling the originals ---------------------------------------------------


def _run_protoc(args: list[str]) -> None:
    """protoc from grpcio-tools (in-process), else Debian's protobuf-compiler."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        binary = shutil.which("protoc")
        if binary is None:
            pytest.fail(
                "no protoc: install grpcio-tools (pip install 'ttrpc[test]') "
                "or Debian's protobuf-compiler"
            )
        result = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=PROTOC_TIMEOUT
        )
        if result.returncode != 0:
            pytest.fail(f"protoc failed on containerd's originals:\n{result.stderr}")
        return
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    status = protoc.main(["protoc", *args, f"-I{well_known}"])
    if status != 0:
        pytest.fail(f"protoc exited with {status} on containerd's originals (see stderr)")


@functools.cache
def _compile_originals() -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "originals.pb"
        _run_protoc(
            [
                f"-I{GOCODE}",
                f"-I{GOGO}",
                f"--descriptor_set_out={out}",
                "--include_imports",
                *(str(GOCODE / name) for name in MAPPING),
            ]
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def originals() -> descriptor_pb2.FileDescriptorSet:
    """Every original compiled (with its imports); the test fails if any is missing."""
    needed = [GOCODE / name for name in MAPPING] + SUPPORT_FILES
    missing = [path for path in needed if not path.is_file()]
    if missing:
        packages = sorted({_debian_package(path) for path in missing})
        pytest.fail(
            "containerd's original .proto files are not installed; "
            f"apt-get install {' '.join(packages)} (missing: "
            + ", ".join(str(path) for path in missing)
            + ")"
        )
    return _compile_originals()


def original_file(name: str) -> descriptor_pb2.FileDescriptorProto:
    return next(file for file in originals().file if file.name == name)


@functools.cache
def original_pool() -> descriptor_pool.DescriptorPool:
    """A private pool holding the originals (kept apart from our own classes)."""
    pool = descriptor_pool.DescriptorPool()
    for file in originals().file:  # --include_imports lists dependencies first
        pool.Add(file)
    return pool


def original_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(original_pool().FindMessageTypeByName(full_name))


def our_file(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """Our file as the generated module carries it."""
    module = importlib.import_module(proto.removesuffix(".proto").replace("/", ".") + "_pb2")
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


# -- comparison ----------------------------------------------------------------


def _known_options(options: Message) -> tuple[tuple[str, Any], ...]:
    """Standard options only: gogoproto extensions parse as unknown fields here.

    ``descriptor_pb2`` knows no extensions unless their modules are imported, and
    nothing here imports gogoproto's, so they never show up in ListFields().
    """
    return tuple((field.name, value) for field, value in options.ListFields())


def _label(field: descriptor_pb2.FieldDescriptorProto) -> str:
    return descriptor_pb2.FieldDescriptorProto.Label.Name(field.label)


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    return descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)


def _qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _messages(scope: str, messages: Any) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        full_name = _qualify(scope, message.name)
        yield full_name, message
        yield from _messages(full_name, message.nested_type)


def _enums(scope: str, enums: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    for enum in enums:
        full_name = _qualify(scope, enum.name)
        yield ("enum", full_name), _known_options(enum.options)
        for value in enum.value:
            yield (
                ("enum value", full_name, value.name),
                (value.number, _known_options(value.options)),
            )


def summarize(
    file: descriptor_pb2.FileDescriptorProto, *, original: bool
) -> dict[tuple[str, ...], Any]:
    """Everything wire- and API-relevant in ``file``, flattened to comparable entries.

    Type names are fully qualified and our packages are containerd's, so they
    compare as they are. json_name is left out: protoc derives it from the field
    name (compared), and generated Python modules do not store it.
    """
    entries: dict[tuple[str, ...], Any] = {
        ("package",): file.package,
        ("syntax",): file.syntax,
        ("edition",): file.edition,
    }
    imports = [name for name in file.dependency if name not in GO_ONLY_IMPORTS]
    if original:
        imports = [MAPPING.get(name, name) for name in imports]
    entries[("imports",)] = sorted(imports)
    scope = file.package
    enums = list(_enums(scope, file.enum_type))
    for full_name, message in _messages(scope, file.message_type):
        entries[("message", full_name)] = _known_options(message.options)
        oneofs = [oneof.name for oneof in message.oneof_decl]
        for oneof in message.oneof_decl:
            entries[("oneof", full_name, oneof.name)] = _known_options(oneof.options)
        fields = [("field", f) for f in message.field]
        fields += [("extension", f) for f in message.extension]
        for kind, field in fields:
            entries[(kind, full_name, field.name)] = (
                field.number,
                _type(field),
                _label(field),
                field.type_name,
                field.extendee,
                oneofs[field.oneof_index] if field.HasField("oneof_index") else None,
                field.proto3_optional,
                field.default_value,
                _known_options(field.options),
            )
        for start, end in ((r.start, r.end) for r in message.extension_range):
            entries[("extension range", full_name, str(start))] = end
        for start, end in ((r.start, r.end) for r in message.reserved_range):
            entries[("reserved range", full_name, str(start))] = end
        for name in message.reserved_name:
            entries[("reserved name", full_name, name)] = True
        enums.extend(_enums(full_name, message.enum_type))
    entries.update(enums)
    for field in file.extension:
        entries[("extension", scope, field.name)] = (field.number, _type(field), field.extendee)
    for service in file.service:
        full_name = _qualify(scope, service.name)
        entries[("service", full_name)] = _known_options(service.options)
        for method in service.method:
            entries[("method", full_name, method.name)] = (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
                _known_options(method.options),
            )
    return entries


def differences(theirs: dict[tuple[str, ...], Any], ours: dict[tuple[str, ...], Any]) -> list[str]:
    problems = []
    for key in sorted(theirs.keys() | ours.keys()):
        where = " ".join(key)
        if key not in ours:
            problems.append(f"missing in ours: {where} = {theirs[key]!r}")
        elif key not in theirs:
            problems.append(f"extra in ours: {where} = {ours[key]!r}")
        elif theirs[key] != ours[key]:
            problems.append(f"differs: {where}: original {theirs[key]!r}, ours {ours[key]!r}")
    return problems


@pytest.mark.parametrize("original", list(MAPPING), ids=_test_id)
def test_matches_original(original: str) -> None:
    theirs = summarize(original_file(original), original=True)
    ours = summarize(our_file(MAPPING[original]), original=False)
    assert len(theirs) > 4, f"nothing compared for {original}"
    problems = differences(theirs, ours)
    assert not problems, f"{MAPPING[original]} differs from {original}:\n" + "\n".join(problems)


def test_every_proto_of_ours_has_an_original() -> None:
    ours = {
        path.relative_to(OURS_DIR).as_posix()
        for path in (OURS_DIR / "containerd_shim").rglob("*.proto")
    }
    assert ours == set(MAPPING.values())


# -- generated ttrpc services --------------------------------------------------

SERVICES = {
    "containerd.task.v2.Task": "containerd_shim.api.runtime.v2.task.shim_ttrpc",
    "containerd.runtime.linux.shim.v1.Shim": "containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc",
    "containerd.services.events.ttrpc.v1.Events": (
        "containerd_shim.api.services.ttrpc.events.v1.events_ttrpc"
    ),
}


@pytest.mark.parametrize("service_name", list(SERVICES))
def test_ttrpc_service_matches_original(service_name: str) -> None:
    service = original_pool().FindServiceByName(service_name)
    expected = {
        method.name: (method.input_type.full_name, method.output_type.full_name)
        for method in service.methods
    }
    module = importlib.import_module(SERVICES[service_name])
    for suffix in ("Service", "BlockingService"):
        described = getattr(module, service.name + suffix)().__ttrpc_service__()
        assert described.name == service_name
        actual = {
            name: (
                method.request_type.DESCRIPTOR.full_name,
                method.response_type.DESCRIPTOR.full_name,
            )
            for name, method in described.methods.items()
        }
        assert actual == expected, suffix
    for suffix in ("Client", "BlockingClient"):
        client = getattr(module, service.name + suffix)
        assert service_name == client.SERVICE_NAME
        assert all(callable(getattr(client, name, None)) for name in expected), suffix


# -- wire round trips ----------------------------------------------------------


def _exited_at() -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789)


def test_task_create_event_round_trip() -> None:
    ours = events_pb2.TaskCreate(
        container_id="c1",
        bundle="/run/containerd/io.containerd.runtime.v2.task/default/c1",
        rootfs=[
            mount_pb2.Mount(
                type="overlay",
                source="overlay",
                target="",
                options=["lowerdir=/l1:/l2", "upperdir=/u", "workdir=/w"],
            )
        ],
        io=events_pb2.TaskIO(stdin="/fifo/in", stdout="/fifo/out", stderr="", terminal=True),
        checkpoint="",
        pid=4242,
    )
    envelope = envelope_pb2.Envelope(namespace="default", topic="/tasks/create")
    envelope.timestamp.CopyFrom(_exited_at())
    envelope.event.Pack(ours)
    forward = envelope_pb2.ForwardRequest(envelope=envelope)

    theirs_forward = original_class("containerd.services.events.ttrpc.v1.ForwardRequest")
    parsed_forward: Any = theirs_forward.FromString(forward.SerializeToString())
    assert parsed_forward.envelope.namespace == "default"
    assert parsed_forward.envelope.topic == "/tasks/create"
    assert parsed_forward.envelope.timestamp.seconds == 1_700_000_000
    assert parsed_forward.envelope.timestamp.nanos == 123_456_789
    assert parsed_forward.envelope.event.type_url == (
        "type.googleapis.com/containerd.events.TaskCreate"
    )

    parsed: Any = original_class("containerd.events.TaskCreate").FromString(
        parsed_forward.envelope.event.value
    )
    assert parsed.container_id == "c1"
    assert parsed.bundle == ours.bundle
    assert len(parsed.rootfs) == 1
    assert parsed.rootfs[0].type == "overlay"
    assert parsed.rootfs[0].source == "overlay"
    assert list(parsed.rootfs[0].options) == list(ours.rootfs[0].options)
    assert (parsed.io.stdin, parsed.io.stdout, parsed.io.stderr, parsed.io.terminal) == (
        "/fifo/in",
        "/fifo/out",
        "",
        True,
    )
    assert parsed.pid == 4242
    assert len(parsed.ListFields()) == len(ours.ListFields())
    # And back: what the original serializes, ours reads the same.
    assert events_pb2.TaskCreate.FromString(parsed.SerializeToString()) == ours


def test_create_task_request_round_trip() -> None:
    options = oci_pb2.Options(binary_name="/usr/bin/runc", root="/run/runc", systemd_cgroup=True)
    ours = shim_pb2.CreateTaskRequest(
        id="c1",
        bundle="/bundle/c1",
        rootfs=[mount_pb2.Mount(type="bind", source="/src", options=["rbind", "ro"])],
        terminal=False,
        stdin="/fifo/in",
        stdout="/fifo/out",
        stderr="/fifo/err",
        checkpoint="/cp",
        parent_checkpoint="/parent",
    )
    ours.options.Pack(options)

    parsed: Any = original_class("containerd.task.v2.CreateTaskRequest").FromString(
        ours.SerializeToString()
    )
    for name in ("id", "bundle", "terminal", "stdin", "stdout", "stderr", "checkpoint"):
        assert getattr(parsed, name) == getattr(ours, name), name
    assert parsed.parent_checkpoint == "/parent"
    assert [(m.type, m.source, m.target, list(m.options)) for m in parsed.rootfs] == [
        ("bind", "/src", "", ["rbind", "ro"])
    ]
    assert parsed.options.type_url == "type.googleapis.com/containerd.runc.v1.Options"
    unpacked: Any = original_class("containerd.runc.v1.Options").FromString(parsed.options.value)
    assert (unpacked.binary_name, unpacked.root, unpacked.systemd_cgroup) == (
        "/usr/bin/runc",
        "/run/runc",
        True,
    )
    assert not unpacked.no_pivot_root
    assert shim_pb2.CreateTaskRequest.FromString(parsed.SerializeToString()) == ours


def test_state_response_round_trip() -> None:
    """The enum from containerd.v1.types and a timestamp survive both ways."""
    ours = shim_pb2.StateResponse(
        id="c1", exec_id="e1", pid=7, exit_status=137, status=task_pb2.STOPPED
    )
    ours.exited_at.CopyFrom(_exited_at())
    theirs_class = original_class("containerd.task.v2.StateResponse")
    parsed: Any = theirs_class.FromString(ours.SerializeToString())
    status = original_pool().FindEnumTypeByName("containerd.v1.types.Status")
    assert status.values_by_number[parsed.status].name == "STOPPED"
    assert (parsed.id, parsed.exec_id, parsed.pid, parsed.exit_status) == ("c1", "e1", 7, 137)
    assert parsed.exited_at.nanos == 123_456_789
    assert shim_pb2.StateResponse.FromString(parsed.SerializeToString()) == ours
