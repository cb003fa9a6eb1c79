"""Client-side steps shared by the asyncio and blocking clients."""

from __future__ import annotations

import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ttrpc.context import Context
from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import Request, Response

T = TypeVar("T", bound=Message)


def build_request(
    service: str, method: str, message: Message, ctx: Context | None
) -> tuple[Request, float | None]:
    """The wire request for a call and its absolute deadline (monotonic), if any.

    A deadline that has already passed fails the call here, before sending.
    """
    request = Request(service=service, method=method, payload=message.SerializeToString())
    if ctx is None:
        return request, None
    if ctx.metadata:
        request.metadata.extend(ctx.metadata.to_wire())
    deadline = ctx.deadline
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        request.timeout_nano = max(1, int(remaining * 1e9))
    return request, deadline


def unpack_response(response: Response, response_type: type[T]) -> T:
    """The call's result, or the :class:`RpcError` its status carries."""
    if response.HasField("status") and response.status.code != Code.OK:
        raise RpcError.from_status(response.status)
    try:
        return response_type.FromString(response.payload)
    except DecodeError as exc:
        raise RpcError(Code.INTERNAL, f"ttrpc: error unmarshalling response: {exc}") from None


def deadline_error() -> RpcError:
    return RpcError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
