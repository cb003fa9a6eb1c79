"""containerd's ttrpc services, built into the command.

The descriptors come from the generated ``containerd_shim.api.*_pb2``
modules (our own copies of containerd's protos, wire- and name-compatible
with the originals). Only those message modules are imported, and only when
a built-in service is needed: nothing of the shim's runtime.

``containerd.task.v3.Task`` (containerd 2.x) is the v2 task API under a new
package; it is derived here from the v2 file, messages included
(``containerd.task.v3.StateRequest`` and so on), as containerd 2's
``api/runtime/task/v3/shim.proto`` declares them.
"""

from __future__ import annotations

import functools
import importlib

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

__all__ = ["BUILTIN_SERVICES", "TASK_V2", "TASK_V3", "builtin_files"]

TASK_V2 = "containerd.task.v2.Task"
TASK_V3 = "containerd.task.v3.Task"
SHIM_V1 = "containerd.runtime.linux.shim.v1.Shim"
EVENTS = "containerd.services.events.ttrpc.v1.Events"
BUILTIN_SERVICES = (TASK_V2, TASK_V3, SHIM_V1, EVENTS)

# The services, and the messages that travel inside their google.protobuf.Any
# fields (runc options, task events, cgroup metrics), so that those render too.
_MODULES = (
    "containerd_shim.api.runtime.v2.task.shim_pb2",
    "containerd_shim.api.runtime.v1.shim.v1.shim_pb2",
    "containerd_shim.api.services.ttrpc.events.v1.events_pb2",
    "containerd_shim.api.events.task_pb2",
    "containerd_shim.api.runtime.v2.runc.options.oci_pb2",
    "containerd_shim.api.runtime.linux.runctypes.runc_pb2",
    "containerd_shim.api.cgroups.stats.v1.metrics_pb2",
    "containerd_shim.api.cgroups.v2.stats.metrics_pb2",
    "containerd_shim.api.types.metrics_pb2",
)
_TASK_V2_FILE = "containerd_shim/api/runtime/v2/task/shim.proto"
_TASK_V3_FILE = "containerd_shim/api/runtime/task/v3/shim.proto"


@functools.cache
def builtin_files() -> tuple[descriptor_pb2.FileDescriptorProto, ...]:
    """Every built-in ``.proto`` file, dependencies before their users."""
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        ordered.append(proto)
        if file.name == _TASK_V2_FILE:
            ordered.append(_task_v3(proto))

    for name in _MODULES:
        add(importlib.import_module(name).DESCRIPTOR)
    return tuple(ordered)


def _task_v3(v2: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The v2 task file with its package (and every reference into it) renamed to v3."""
    old, new = ".containerd.task.v2.", ".containerd.task.v3."
    v3 = descriptor_pb2.FileDescriptorProto()
    v3.CopyFrom(v2)
    v3.name = _TASK_V3_FILE
    v3.package = "containerd.task.v3"

    def rename(type_name: str) -> str:
        return new + type_name[len(old) :] if type_name.startswith(old) else type_name

    def fix(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            if field.type_name.startswith(old):  # scalars have none: leave them unset
                field.type_name = rename(field.type_name)
        for nested in message.nested_type:
            fix(nested)

    for message in v3.message_type:
        fix(message)
    for service in v3.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    return v3
