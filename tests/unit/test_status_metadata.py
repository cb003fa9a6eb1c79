"""Status codes, the exception mapping, metadata and contexts."""

from __future__ import annotations

import asyncio
import time

import pytest
from google.protobuf.any_pb2 import Any

from ttrpc import Code, ConnectionClosed, Context, Metadata, RpcError
from ttrpc.status import code_for_exception, status_from_exception
from ttrpc.ttrpc_pb2 import KeyValue


def test_codes_match_grpc() -> None:
    assert [c.value for c in Code] == list(range(17))
    assert Code.UNAUTHENTICATED == 16 and Code.UNIMPLEMENTED == 12


def test_rpc_error_round_trips_through_status() -> None:
    detail = Any(type_url="type.googleapis.com/x.Y", value=b"\x01")
    err = RpcError(Code.NOT_FOUND, "missing", [detail])
    back = RpcError.from_status(err.to_status())
    assert back.code is Code.NOT_FOUND and back.message == "missing"
    assert list(back.details) == [detail]
    assert str(back) == "NOT_FOUND: missing"
    assert RpcError(99, "odd").code == 99


def test_connection_closed_is_unavailable() -> None:
    assert ConnectionClosed().code is Code.UNAVAILABLE


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RpcError(Code.ABORTED, "x"), Code.ABORTED),
        (asyncio.CancelledError(), Code.CANCELLED),
        (TimeoutError(), Code.DEADLINE_EXCEEDED),
        (NotImplementedError(), Code.UNIMPLEMENTED),
        (FileNotFoundError(), Code.NOT_FOUND),
        (KeyError("k"), Code.NOT_FOUND),
        (FileExistsError(), Code.ALREADY_EXISTS),
        (PermissionError(), Code.PERMISSION_DENIED),
        (ValueError(), Code.INVALID_ARGUMENT),
        (EOFError(), Code.OUT_OF_RANGE),
        (BrokenPipeError(), Code.UNAVAILABLE),
        (RuntimeError("boom"), Code.UNKNOWN),
    ],
)
def test_exception_mapping(exc: BaseException, code: Code) -> None:
    assert code_for_exception(exc) == code
    assert status_from_exception(exc).code == code


def test_exception_message_falls_back_to_class_name() -> None:
    assert status_from_exception(RuntimeError()).message == "RuntimeError"
    assert status_from_exception(RuntimeError("boom")).message == "boom"


def test_metadata_lower_cases_application_keys() -> None:
    md = Metadata({"Foo": "1", "bar": ["2", "3"]})
    md.append("FOO", "4")
    assert md["foo"] == ["1", "4"] and md["Foo"] == ["1", "4"]
    assert md.pairs() == [("foo", "1"), ("foo", "4"), ("bar", "2"), ("bar", "3")]
    md.set("bar")
    assert "bar" not in md
    assert md.get_one("missing") is None and md.get_one("FOO") == "1"


def test_metadata_from_wire_keeps_keys_as_received() -> None:
    md = Metadata.from_wire([KeyValue(key="X-Key", value="a"), KeyValue(key="X-Key", value="b")])
    assert list(md) == ["X-Key"]
    assert md["X-Key"] == ["a", "b"]
    assert [(kv.key, kv.value) for kv in md.to_wire()] == [("X-Key", "a"), ("X-Key", "b")]


def test_context_deadline() -> None:
    ctx = Context(timeout=10)
    remaining = ctx.time_remaining()
    assert remaining is not None and 9 < remaining <= 10
    assert not ctx.cancelled
    assert Context(deadline=time.monotonic() - 1).cancelled
    assert Context().time_remaining() is None
    with pytest.raises(ValueError):
        Context(timeout=1, deadline=1)
