"""containerd's own Tasks API (gRPC), for what ``ctr`` 1.6 cannot do.

``ctr`` always creates and starts a task in one go, and cannot wait for a process or delete an
exec process it did not start itself. Tests that need a task created but not started, or the
exit status of an exec after a containerd restart, call containerd's
``containerd.services.tasks.v1.Tasks`` service the way containerd's Go client does: gRPC on
containerd's socket, the namespace in the ``containerd-namespace`` header.

The few messages used are declared here, field for field as in containerd 1.6's
``api/services/tasks/v1/tasks.proto`` (fields we do not use are left out: protobuf skips them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.message import Message

from containerd_shim.api.types.task.task_pb2 import Process, Status

from .containerd import Containerd

__all__ = ["Process", "Status", "TasksAPI", "WaitResult"]

SERVICE = "containerd.services.tasks.v1.Tasks"
_PACKAGE = "containerd.services.tasks.v1"

_F = descriptor_pb2.FieldDescriptorProto
# message -> (field name, number, type) in containerd 1.6's tasks.proto.
_MESSAGES: dict[str, list[tuple[str, int, int]]] = {
    "CreateTaskRequest": [("container_id", 1, _F.TYPE_STRING)],
    "CreateTaskResponse": [("container_id", 1, _F.TYPE_STRING), ("pid", 2, _F.TYPE_UINT32)],
    "StartRequest": [("container_id", 1, _F.TYPE_STRING), ("exec_id", 2, _F.TYPE_STRING)],
    "StartResponse": [("pid", 1, _F.TYPE_UINT32)],
    "WaitRequest": [("container_id", 1, _F.TYPE_STRING), ("exec_id", 2, _F.TYPE_STRING)],
    "WaitResponse": [("exit_status", 1, _F.TYPE_UINT32), ("exited_at", 2, _F.TYPE_MESSAGE)],
    "GetRequest": [("container_id", 1, _F.TYPE_STRING), ("exec_id", 2, _F.TYPE_STRING)],
    # process: a containerd.v1.types.Process, decoded with our copy of that message.
    "GetResponse": [("process", 1, _F.TYPE_BYTES)],
    "DeleteProcessRequest": [("container_id", 1, _F.TYPE_STRING), ("exec_id", 2, _F.TYPE_STRING)],
    "DeleteResponse": [
        ("id", 1, _F.TYPE_STRING),
        ("pid", 2, _F.TYPE_UINT32),
        ("exit_status", 3, _F.TYPE_UINT32),
        ("exited_at", 4, _F.TYPE_MESSAGE),
    ],
}


def _message_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()
    stamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(stamp)
    pool.Add(stamp)
    proto = descriptor_pb2.FileDescriptorProto(
        name="e2e/containerd_tasks.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[stamp.name],
    )
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field_name, number, kind in fields:
            field = message.field.add(
                name=field_name, number=number, type=kind, label=_F.LABEL_OPTIONAL
            )
            if kind == _F.TYPE_MESSAGE:
                field.type_name = ".google.protobuf.Timestamp"
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _message_classes()


@dataclass(frozen=True)
class WaitResult:
    exit_status: int
    exited_at_ns: int


class TasksAPI:
    """A gRPC connection to one containerd's Tasks service, in its test namespace."""

    def __init__(self, cd: Containerd, namespace: str | None = None) -> None:
        self._channel = grpc.insecure_channel(f"unix://{cd.address}")
        self._metadata = (("containerd-namespace", namespace or cd.namespace),)

    def __enter__(self) -> TasksAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _method(self, name: str, request: str, response: str) -> Any:
        return self._channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=_CLASSES[response].FromString,
        )

    def _call(self, name: str, request: str, response: str, timeout: float, **fields: str) -> Any:
        message = _CLASSES[request](**fields)
        return self._method(name, request, response)(
            message, timeout=timeout, metadata=self._metadata
        )

    def create(self, container_id: str, timeout: float = 30) -> int:
        """Create the task of an existing container (no stdio); its init pid."""
        reply = self._call(
            "Create", "CreateTaskRequest", "CreateTaskResponse", timeout, container_id=container_id
        )
        return int(reply.pid)

    def start(self, container_id: str, exec_id: str = "", timeout: float = 30) -> int:
        """Start a created task (or exec process); its pid."""
        reply = self._call(
            "Start",
            "StartRequest",
            "StartResponse",
            timeout,
            container_id=container_id,
            exec_id=exec_id,
        )
        return int(reply.pid)

    def wait(self, container_id: str, exec_id: str = "", timeout: float = 30) -> WaitResult:
        """Block until the process has exited (containerd asks the shim); its exit."""
        reply = self._call(
            "Wait",
            "WaitRequest",
            "WaitResponse",
            timeout,
            container_id=container_id,
            exec_id=exec_id,
        )
        return WaitResult(int(reply.exit_status), reply.exited_at.ToNanoseconds())

    def wait_async(self, container_id: str, timeout: float) -> grpc.Future:
        """``wait`` in the background: a future whose result is the WaitResponse."""
        message = _CLASSES["WaitRequest"](container_id=container_id)
        method = self._method("Wait", "WaitRequest", "WaitResponse")
        return cast(grpc.Future, method.future(message, timeout=timeout, metadata=self._metadata))

    def get(self, container_id: str, exec_id: str = "", timeout: float = 30) -> Process:
        """The process as containerd reports it (status, pid, exit status)."""
        reply = self._call(
            "Get", "GetRequest", "GetResponse", timeout, container_id=container_id, exec_id=exec_id
        )
        return Process.FromString(reply.process)

    def delete_process(self, container_id: str, exec_id: str, timeout: float = 30) -> int:
        """Delete a stopped exec process; its exit status."""
        reply = self._call(
            "DeleteProcess",
            "DeleteProcessRequest",
            "DeleteResponse",
            timeout,
            container_id=container_id,
            exec_id=exec_id,
        )
        return int(reply.exit_status)
