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
    service: str, method: str, message: Message | None, ctx: Context | None
) -> tuple[Request, float | None]:
    """The wire request for a call and its absolute deadline (monotonic), if any.

    ``message`` is None for a client-streaming or bidi call (its messages follow as
    Data frames). A deadline that has already passed fails the call here, before sending.
    """
    if message is None:
        request = Request(service=service, method=method)
    else:
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


def decode_message(payload: bytes, message_type: type[T]) -> T:
    """One stream message; an undecodable one is INTERNAL, as Go reports it."""
    try:
        return message_type.FromString(payload)
    except DecodeError as exc:
        raise RpcError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None


def serialize(message: object, expected: type[Message]) -> bytes:
    """The wire form of a message a stream sends; anything else is a programming error."""
    if not isinstance(message, Message):
        raise TypeError(
            f"ttrpc: stream message must be {expected.__name__}, not {type(message).__name__}"
        )
    return message.SerializeToString()


def stalled_error(stream_id: int, timeout: float) -> RpcError:
    return RpcError(
        Code.RESOURCE_EXHAUSTED,
        f"ttrpc: receive buffer of stream {stream_id} is full: its consumer took no message "
        f"for {timeout:g} s",
    )


def finished_error() -> RpcError:
    return RpcError(Code.FAILED_PRECONDITION, "ttrpc: send on a finished stream")


def status_of_response(response: Response) -> RpcError | None:
    """The error a final Response carries, or None when it is OK."""
    if response.HasField("status") and response.status.code != Code.OK:
        return RpcError.from_status(response.status)
    return None
