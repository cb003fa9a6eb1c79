"""The sans-I/O core: framing, limits and the rules each side enforces."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrpc.protocol import (
    HEADER_LENGTH,
    MAX_MESSAGE_LENGTH,
    MESSAGE_TYPE_DATA,
    MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
    STREAM_MESSAGE_OVERHEAD,
    CallFailed,
    ClientConnection,
    Frame,
    FrameReader,
    FrameTooLarge,
    RefusingConnection,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    StreamEnded,
    StreamMessage,
    StreamReset,
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
        assert isinstance(event, (RequestReceived, StreamMessage, StreamEnded, StreamReset))
    conn.data_to_send()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 9),
            st.sampled_from([1, 2, 3, 7]),
            st.integers(0, 7),
            st.binary(max_size=20),
        ),
        max_size=30,
    )
)
def test_both_sides_never_raise_on_any_frame_sequence(
    frames: list[tuple[int, int, int, bytes]],
) -> None:
    server = ServerConnection(max_message_length=16, stream_buffer_size=100)
    client = ClientConnection(max_message_length=16, stream_buffer_size=100)
    client.open_stream(Request(service="s", method="m"), client_streaming=True)
    client.open_stream(Request(service="s", method="m"), client_streaming=False)
    client.send_request(Request())
    data = b"".join(encode_frame(sid, t, p, f) for sid, t, f, p in frames)
    for event in server.receive_data(data):
        if isinstance(event, StreamMessage):
            server.message_consumed(event.stream_id, len(event.payload))
    server.data_to_send()
    for event in client.receive_data(data):
        if isinstance(event, StreamMessage):
            client.message_consumed(event.stream_id, len(event.payload))
    assert not server.backlogged and not client.backlogged


def test_refusing_connection_answers_each_request_from_its_header() -> None:
    refusing = RefusingConnection(Code.RESOURCE_EXHAUSTED, "full")
    big = request_frame(5, payload=b"x" * 100_000)
    data = request_frame(1) + header(0, 2, MESSAGE_TYPE_DATA) + request_frame(3) + big
    answers = b""
    for i in range(0, len(data), 7):  # any split
        answers += refusing.receive_data(data[i : i + 7])
        assert refusing.reader.buffered <= HEADER_LENGTH + 1  # headers only, never payloads
    assert refusing.answered == 3
    assert not refusing.mid_frame
    client = ClientConnection()
    for _ in range(3):
        client.send_request(Request(service="s", method="m"))
    events = client.receive_data(answers)
    assert [e.stream_id for e in events] == [1, 3, 5]
    for event in events:
        assert type(event) is ResponseReceived
        assert event.response.status == Status(code=Code.RESOURCE_EXHAUSTED, message="full")
    # The answer to a request comes with its header; its payload is still arriving.
    refusing = RefusingConnection(Code.RESOURCE_EXHAUSTED, "full")
    assert refusing.receive_data(big[: HEADER_LENGTH + 10])
    assert refusing.mid_frame
    assert refusing.receive_data(big[HEADER_LENGTH + 10 :]) == b""
    assert not refusing.mid_frame


@given(st.binary(max_size=2048), st.lists(st.integers(min_value=1, max_value=64), max_size=50))
def test_refusing_connection_never_raises_and_stays_bounded(data: bytes, cuts: list[int]) -> None:
    refusing = RefusingConnection(Code.RESOURCE_EXHAUSTED, "full")
    pos = 0
    for cut in [*cuts, len(data)]:
        refusing.receive_data(data[pos : pos + cut])
        pos += cut
        assert refusing.reader.buffered <= HEADER_LENGTH + 1


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


# -- streams: golden bytes written from the ttrpc 1.2 rules -------------------------------
#
# Request(service="s", method="m") is 0a 01 73 12 01 6d; KeyValue(key="a") is 0a 01 61.
# Header: length (4), stream id (4), type (1: request, 2: response, 3: data), flags.

REQ_NO_PAYLOAD = bytes.fromhex("0a0173 12016d")
MSG_A = bytes.fromhex("0a0161")
REQ_WITH_A = REQ_NO_PAYLOAD + bytes.fromhex("1a03") + MSG_A

SERVER_STREAMING_REQUEST = bytes.fromhex("0000000b 00000001 01 01") + REQ_WITH_A
CLIENT_STREAMING_REQUEST = bytes.fromhex("00000006 00000001 01 02") + REQ_NO_PAYLOAD
DATA_A = bytes.fromhex("00000003 00000001 03 00") + MSG_A
DATA_EMPTY = bytes.fromhex("00000000 00000001 03 00")
CLOSE = bytes.fromhex("00000000 00000001 03 05")
REPLY_A = bytes.fromhex("00000005 00000001 02 00 1203") + MSG_A
ABORTED_X = bytes.fromhex("00000007 00000001 02 00 0a05 080a 120178")


def _stream_request(payload: bytes = b"") -> Request:
    return Request(service="s", method="m", payload=payload)


def test_golden_unary_is_unchanged() -> None:
    client = ClientConnection()
    _, frame = client.send_request(_stream_request(MSG_A))
    assert frame == bytes.fromhex("0000000b 00000001 01 00") + REQ_WITH_A


def test_golden_server_streaming() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, frame = client.open_stream(_stream_request(MSG_A), client_streaming=False)
    assert (sid, frame) == (1, SERVER_STREAMING_REQUEST)
    with pytest.raises(RpcError):
        client.send_message(1, MSG_A)  # the request was the one message
    assert client.close_send(1) == b""
    events = server.receive_data(frame)
    assert events == [RequestReceived(1, _stream_request(MSG_A), 0x01)]
    out = server.encode_message(1, MSG_A) + server.encode_message(1, b"") + server.encode_end(1)
    assert out == DATA_A + DATA_EMPTY + CLOSE
    assert client.receive_data(out) == [
        StreamMessage(1, MSG_A),
        StreamMessage(1, b""),  # an empty message is delivered
        StreamEnded(1),  # the end: no Response
    ]
    assert not client.is_open(1) and not server.is_open(1)


def test_golden_server_streaming_error() -> None:
    client, server = ClientConnection(), ServerConnection()
    client.open_stream(_stream_request(MSG_A), client_streaming=False)
    server.receive_data(SERVER_STREAMING_REQUEST)
    out = server.encode_message(1, MSG_A) + server.encode_error(
        1, Status(code=Code.ABORTED, message="x")
    )
    assert out == DATA_A + ABORTED_X
    events = client.receive_data(out)
    assert events[0] == StreamMessage(1, MSG_A)
    assert isinstance(events[1], ResponseReceived) and events[1].response.status.code == 10


def test_golden_client_streaming() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, frame = client.open_stream(_stream_request(), client_streaming=True)
    assert frame == CLIENT_STREAMING_REQUEST  # no payload in the request
    out = client.send_message(sid, MSG_A) + client.send_message(sid, b"") + client.close_send(sid)
    assert out == DATA_A + DATA_EMPTY + CLOSE  # the close is its own empty frame
    assert client.close_send(sid) == b""
    events = server.receive_data(frame + out)
    assert events == [
        RequestReceived(1, _stream_request(), 0x02),
        StreamMessage(1, MSG_A),
        StreamMessage(1, b""),
        StreamEnded(1),
    ]
    reply = server.encode_response(1, MSG_A)
    assert reply == REPLY_A  # a normal Response carries the one reply
    events = client.receive_data(reply)
    assert events == [ResponseReceived(1, Response(payload=MSG_A))]


def test_golden_bidi() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, frame = client.open_stream(_stream_request(), client_streaming=True)
    assert frame == CLIENT_STREAMING_REQUEST
    assert server.receive_data(frame + client.send_message(sid, MSG_A)) == [
        RequestReceived(1, _stream_request(), 0x02),
        StreamMessage(1, MSG_A),
    ]
    assert client.receive_data(server.encode_message(1, MSG_A)) == [StreamMessage(1, MSG_A)]
    assert server.receive_data(client.close_send(sid)) == [StreamEnded(1)]
    assert client.receive_data(server.encode_end(1)) == [StreamEnded(1)]
    assert server.open_streams == 0 and client.open_streams == 0


def test_server_stream_rules() -> None:
    server = ServerConnection()
    server.receive_data(CLIENT_STREAMING_REQUEST)
    # Data for a stream never opened: InvalidArgument on that stream.
    assert server.receive_data(encode_frame(9, MESSAGE_TYPE_DATA, MSG_A)) == []
    (answer,) = responses(server.data_to_send())
    assert (answer[0], answer[1].status.code) == (9, Code.INVALID_ARGUMENT)
    # NO_DATA without a close carries nothing; a close may carry a last message.
    assert server.receive_data(encode_frame(1, MESSAGE_TYPE_DATA, MSG_A, flags=0x04)) == []
    assert server.receive_data(encode_frame(1, MESSAGE_TYPE_DATA, MSG_A, flags=0x01)) == [
        StreamMessage(1, MSG_A),
        StreamEnded(1),
    ]
    assert server.receive_data(CLOSE) == []  # a second close: ignored
    # Data after the client closed: the stream is reset with InvalidArgument.
    events = server.receive_data(DATA_A)
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    (answer,) = responses(server.data_to_send())
    assert (answer[0], answer[1].status.code) == (1, Code.INVALID_ARGUMENT)
    assert not server.is_open(1)
    # A stream that is over: its late frames are dropped without an answer.
    assert server.receive_data(DATA_A + CLOSE) == []
    assert server.data_to_send() == b""


def test_stream_ids_must_increase_for_streams_too() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(5, MESSAGE_TYPE_REQUEST, REQ_NO_PAYLOAD, flags=0x02))
    assert server.receive_data(encode_frame(3, MESSAGE_TYPE_REQUEST, REQ_NO_PAYLOAD, 0x02)) == []
    (answer,) = responses(server.data_to_send())
    assert (answer[0], answer[1].status.code) == (3, Code.INVALID_ARGUMENT)


def test_oversize_data_resets_the_stream() -> None:
    server = ServerConnection(max_message_length=64)
    server.receive_data(CLIENT_STREAMING_REQUEST)
    events = server.receive_data(header(100, 1, MESSAGE_TYPE_DATA) + b"z" * 100)
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert events[0].error.code == Code.RESOURCE_EXHAUSTED
    (answer,) = responses(server.data_to_send())
    assert (answer[0], answer[1].status.code) == (1, Code.RESOURCE_EXHAUSTED)
    client = ClientConnection(max_message_length=64)
    sid, _ = client.open_stream(_stream_request(), client_streaming=True)
    events = client.receive_data(header(100, sid, MESSAGE_TYPE_DATA) + b"z" * 100)
    assert isinstance(events[0], CallFailed) and events[0].error.code == Code.RESOURCE_EXHAUSTED
    assert client.abandon_stream(sid) == CLOSE  # our side was open: close it
    with pytest.raises(RpcError) as err:
        client.send_message(sid, b"x" * 65)
    assert err.value.code == Code.FAILED_PRECONDITION


def test_client_limits_and_abandon() -> None:
    client = ClientConnection(max_message_length=16)
    sid, _ = client.open_stream(_stream_request(), client_streaming=True)
    with pytest.raises(RpcError) as err:
        client.send_message(sid, b"x" * 17)
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert client.abandon_stream(sid) == CLOSE
    assert client.abandon_stream(sid) == b""
    # Frames for an abandoned stream are dropped.
    assert client.receive_data(DATA_A + CLOSE) == []
    sid2, _ = client.open_stream(_stream_request(), client_streaming=False)
    assert sid2 == 3 and client.abandon_stream(sid2) == b""  # nothing of ours was open


def test_receive_buffers_are_counted() -> None:
    limit = 4 * (3 + STREAM_MESSAGE_OVERHEAD)
    server = ServerConnection(stream_buffer_size=limit)
    server.receive_data(CLIENT_STREAMING_REQUEST)
    server.receive_data(DATA_A * 4)
    assert not server.backlogged  # exactly at the bound
    server.receive_data(DATA_A)
    assert server.backlogged and server.full_streams() == [1]
    server.message_consumed(1, 3)
    assert server.backlogged  # full until it drains to half
    server.message_consumed(1, 3)
    server.message_consumed(1, 3)
    assert not server.backlogged
    server.receive_data(DATA_A * 3)
    assert server.backlogged
    server.encode_end(1)  # the stream is over: its buffer no longer counts
    assert not server.backlogged
    # Empty messages count too.
    client = ClientConnection(stream_buffer_size=STREAM_MESSAGE_OVERHEAD * 2)
    client.open_stream(_stream_request(), client_streaming=False)
    client.receive_data(DATA_EMPTY * 3)
    assert client.backlogged
    client.abandon_stream(1)
    assert not client.backlogged
    with pytest.raises(ValueError):
        ServerConnection(stream_buffer_size=0)


def test_unary_calls_ignore_stream_frames() -> None:
    client = ClientConnection()
    sid, _ = client.send_request(Request())
    assert client.receive_data(encode_frame(sid, MESSAGE_TYPE_DATA, MSG_A, 0x01)) == []
    assert client.pending == 1
