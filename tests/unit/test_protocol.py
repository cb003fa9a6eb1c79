"""The sans-I/O core: framing, limits and the rules each side enforces."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrpc.protocol import (
    HEADER_LENGTH,
    MAX_MESSAGE_LENGTH,
    MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
    CallFailed,
    ClientConnection,
    Frame,
    FrameReader,
    FrameTooLarge,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    encode_frame,
)
from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import KeyValue, Request, Response, Status


def header(length: int, stream_id: int, mtype: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, mtype, flags)


def request_frame(
    stream_id: int, service: str = "s", method: str = "m", payload: bytes = b""
) -> bytes:
    body = Request(service=service, method=method, payload=payload).SerializeToString()
    return header(len(body), stream_id, MESSAGE_TYPE_REQUEST) + body


def responses(data: bytes) -> list[tuple[int, Response]]:
    out = []
    for frame in FrameReader().feed(data):
        assert isinstance(frame, Frame)
        assert frame.type == MESSAGE_TYPE_RESPONSE
        out.append((frame.stream_id, Response.FromString(frame.payload)))
    return out


def test_header_layout_is_big_endian_length_id_type_flags() -> None:
    assert (
        encode_frame(0x01020304, 2, b"xy", flags=5) == bytes([0, 0, 0, 2, 1, 2, 3, 4, 2, 5]) + b"xy"
    )
    assert HEADER_LENGTH == 10 and MAX_MESSAGE_LENGTH == 4 << 20


def test_reader_handles_any_split() -> None:
    data = encode_frame(1, 1, b"hello") + encode_frame(3, 2, b"") + encode_frame(5, 9, b"x" * 300)
    for step in (1, 2, 3, 7, 10, 11, 64, len(data)):
        reader = FrameReader()
        frames = []
        for i in range(0, len(data), step):
            frames += reader.feed(data[i : i + step])
        assert frames == [Frame(1, 1, 0, b"hello"), Frame(3, 2, 0, b""), Frame(5, 9, 0, b"x" * 300)]
        assert reader.buffered == 0


def test_reader_discards_oversize_payload_without_buffering_it() -> None:
    reader = FrameReader(max_message_length=16)
    events = reader.feed(header(100, 7, 1))
    assert events == [FrameTooLarge(7, 1, 0, 100)]
    assert reader.feed(b"z" * 60) == []
    assert reader.buffered == 0
    # The last 40 bytes of the oversize body and a whole valid frame in one chunk.
    assert reader.feed(b"z" * 40 + encode_frame(9, 1, b"ok")) == [Frame(9, 1, 0, b"ok")]


def test_limit_must_stay_within_protocol() -> None:
    with pytest.raises(ValueError):
        FrameReader(max_message_length=1 << 24)
    with pytest.raises(ValueError):
        FrameReader(max_message_length=0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=1, max_value=64), max_size=50))
def test_reader_never_raises_and_stays_bounded(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(max_message_length=256)
    pos = 0
    for cut in [*cuts, len(data)]:
        chunk = data[pos : pos + cut]
        pos += cut
        for frame in reader.feed(chunk):
            assert isinstance(frame, (Frame, FrameTooLarge))
        assert reader.buffered <= HEADER_LENGTH + 256


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1024))
def test_server_connection_never_raises_on_garbage(data: bytes) -> None:
    conn = ServerConnection(max_message_length=128)
    for event in conn.receive_data(data):
        assert isinstance(event, RequestReceived)
    conn.data_to_send()


def test_server_accepts_odd_increasing_ids() -> None:
    conn = ServerConnection()
    events = conn.receive_data(request_frame(1) + request_frame(3, payload=b"p"))
    assert [e.stream_id for e in events] == [1, 3]
    assert events[1].request.payload == b"p"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("frames", "bad_id", "code"),
    [
        (request_frame(2), 2, Code.INVALID_ARGUMENT),
        (request_frame(5) + request_frame(5), 5, Code.INVALID_ARGUMENT),
        (request_frame(5) + request_frame(3), 3, Code.INVALID_ARGUMENT),
        (header(5, 7, MESSAGE_TYPE_REQUEST) + b"\xff\xff\xff\xff\xff", 7, Code.INVALID_ARGUMENT),
    ],
    ids=["even", "reused", "decreasing", "undecodable"],
)
def test_server_rejects_bad_requests_on_their_stream(
    frames: bytes, bad_id: int, code: Code
) -> None:
    conn = ServerConnection()
    conn.receive_data(frames)
    answers = responses(conn.data_to_send())
    assert [(sid, r.status.code) for sid, r in answers] == [(bad_id, code)]


def test_server_answers_oversize_and_keeps_going() -> None:
    conn = ServerConnection(max_message_length=64)
    events = conn.receive_data(
        header(1000, 1, MESSAGE_TYPE_REQUEST) + b"\0" * 1000 + request_frame(3)
    )
    assert [e.stream_id for e in events] == [3]
    answers = responses(conn.data_to_send())
    assert [(sid, r.status.code) for sid, r in answers] == [(1, Code.RESOURCE_EXHAUSTED)]


def test_server_ignores_unknown_frame_types() -> None:
    conn = ServerConnection()
    events = conn.receive_data(encode_frame(1, 0x7F, b"whatever") + request_frame(3))
    assert [e.stream_id for e in events] == [3]
    assert conn.data_to_send() == b""


def test_server_turns_oversize_response_into_resource_exhausted() -> None:
    conn = ServerConnection(max_message_length=64)
    answers = responses(conn.encode_response(1, b"x" * 100))
    assert answers[0][1].status.code == Code.RESOURCE_EXHAUSTED
    ok = responses(conn.encode_response(3, b"x" * 10))
    assert ok == [(3, Response(payload=b"x" * 10))]


def test_client_allocates_odd_increasing_ids_and_refuses_oversize() -> None:
    conn = ClientConnection(max_message_length=64)
    ids = [conn.send_request(Request(service="s", method="m"))[0] for _ in range(3)]
    assert ids == [1, 3, 5]
    with pytest.raises(RpcError) as err:
        conn.send_request(Request(payload=b"x" * 100))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert conn.send_request(Request())[0] == 7  # the refused request used no id


def test_client_matches_responses_and_drops_unknown_or_abandoned() -> None:
    conn = ClientConnection(max_message_length=64)
    first, _ = conn.send_request(Request())
    second, _ = conn.send_request(Request())
    third, _ = conn.send_request(Request())
    conn.abandon(second)
    ok = Response(payload=KeyValue(key="k").SerializeToString()).SerializeToString()
    failed = Response(status=Status(code=5, message="nf")).SerializeToString()
    data = (
        encode_frame(second, MESSAGE_TYPE_RESPONSE, ok)  # late: dropped
        + encode_frame(99, MESSAGE_TYPE_RESPONSE, ok)  # never asked: dropped
        + encode_frame(first, 0x7F, ok)  # unknown type: ignored
        + encode_frame(first, MESSAGE_TYPE_RESPONSE, ok)
        + header(1000, third, MESSAGE_TYPE_RESPONSE)
        + b"\0" * 1000
    )
    events = conn.receive_data(data)
    assert len(events) == 2
    assert isinstance(events[0], ResponseReceived) and events[0].stream_id == first
    assert isinstance(events[1], CallFailed) and events[1].stream_id == third
    assert events[1].error.code == Code.RESOURCE_EXHAUSTED
    assert conn.pending == 0
    fourth, _ = conn.send_request(Request())
    events = conn.receive_data(encode_frame(fourth, MESSAGE_TYPE_RESPONSE, failed))
    assert isinstance(events[0], ResponseReceived)
    assert events[0].response.status.code == 5


def test_client_reports_undecodable_response_as_internal() -> None:
    conn = ClientConnection()
    sid, _ = conn.send_request(Request())
    events = conn.receive_data(encode_frame(sid, MESSAGE_TYPE_RESPONSE, b"\xff\xff\xff"))
    assert isinstance(events[0], CallFailed)
    assert events[0].error.code == Code.INTERNAL
