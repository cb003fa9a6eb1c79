"""The sans-I/O ttrpc protocol core.

Bytes go in, events come out; frames to send come back as bytes. Nothing
here touches a socket, a thread or an event loop, so the asyncio and the
blocking drivers share every protocol rule and the core can be fuzzed alone.

A frame is a 10-byte header (payload length, stream id: uint32 big-endian;
message type, flags: uint8) and a payload of at most
:data:`MAX_MESSAGE_LENGTH` bytes.
"""

from __future__ import annotations

import struct

from google.protobuf.message import DecodeError

from ttrpc.status import Code, RpcError
from ttrpc.ttrpc_pb2 import Request, Response, Status

__all__ = [
    "FLAGS_CLOSE",
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "MESSAGE_TYPE_DATA",
    "MESSAGE_TYPE_REQUEST",
    "MESSAGE_TYPE_RESPONSE",
    "STREAM_BUFFER_SIZE",
    "STREAM_MESSAGE_OVERHEAD",
    "CallFailed",
    "ClientConnection",
    "Frame",
    "FrameReader",
    "FrameTooLarge",
    "RefusingConnection",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "StreamEnded",
    "StreamMessage",
    "StreamReset",
    "encode_frame",
    "read_buffer",
]

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
#: Bytes a driver reads from the socket at once (into a buffer it keeps).
READ_SIZE = 64 * 1024


def read_buffer(size: int = READ_SIZE) -> memoryview:
    """A writable, zeroed buffer to read into, kept for a connection's life.

    An anonymous mapping rather than a ``bytearray``: its pages are only faulted
    in when a read reaches them, so a connection that carries small messages
    holds a page or two, not ``size`` bytes (``bytearray`` zero-fills, touching
    them all; with many idle connections, or one per shim, that adds up).
    """
    import mmap

    return memoryview(mmap.mmap(-1, size))


#: The length field is 32 bits, but the first byte must stay zero so peers
#: can tell a ttrpc frame from other traffic; no limit may go beyond this.
PROTOCOL_MAX_MESSAGE_LENGTH = (1 << 24) - 1

MESSAGE_TYPE_REQUEST = 0x1
MESSAGE_TYPE_RESPONSE = 0x2
MESSAGE_TYPE_DATA = 0x3

# Flags (ttrpc 1.2). On a Request: 0 = unary; REMOTE_CLOSED = server-streaming only (the
# request carries the one message); REMOTE_OPEN = the client goes on sending Data frames.
# On Data: REMOTE_CLOSED = the sender's last frame; NO_DATA = no message in this frame (a
# zero-length Data frame without it is an empty message).
FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4
#: A sender closing its side: an empty Data frame flagged REMOTE_CLOSED | NO_DATA.
FLAGS_CLOSE = FLAG_REMOTE_CLOSED | FLAG_NO_DATA

#: Default bound of one stream's receive buffer, in bytes (see :data:`STREAM_MESSAGE_OVERHEAD`).
STREAM_BUFFER_SIZE = 1 << 20
#: What a buffered message counts for besides its payload (the objects that hold it), so
#: that a flood of empty messages is bounded too.
STREAM_MESSAGE_OVERHEAD = 64

Buffer = bytes | bytearray | memoryview
"""What the readers accept: any contiguous bytes."""

_HEADER = struct.Struct(">IIBB")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from


def encode_frame(stream_id: int, message_type: int, payload: bytes, flags: int = 0) -> bytes:
    """One frame: header and payload, ready to write."""
    return _pack_header(len(payload), stream_id, message_type, flags) + payload


def check_max_message_length(value: int) -> int:
    """Validate a configured message limit."""
    if not 0 < value <= PROTOCOL_MAX_MESSAGE_LENGTH:
        raise ValueError(f"message length limit must be in 1..{PROTOCOL_MAX_MESSAGE_LENGTH}")
    return value


class _Record:
    """A small value type: positional fields in ``__slots__`` order, compared by value."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Frame(_Record):
    """A complete frame as read from the peer."""

    __slots__ = ("flags", "payload", "stream_id", "type")
    stream_id: int
    type: int
    flags: int
    payload: bytes

    def __init__(self, stream_id: int, type: int, flags: int, payload: bytes) -> None:
        self.stream_id = stream_id
        self.type = type
        self.flags = flags
        self.payload = payload


class FrameTooLarge(_Record):
    """A frame whose declared length is over the limit; its payload is discarded unread."""

    __slots__ = ("flags", "length", "stream_id", "type")
    stream_id: int
    type: int
    flags: int
    length: int

    def __init__(self, stream_id: int, type: int, flags: int, length: int) -> None:
        self.stream_id = stream_id
        self.type = type
        self.flags = flags
        self.length = length


class FrameReader:
    """Incremental frame parser.

    Buffers at most one frame's header and payload (never more than the
    limit): an oversize payload is skipped as it arrives, not stored.
    """

    __slots__ = ("_buf", "_discard", "max_message_length")

    def __init__(self, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        self.max_message_length = check_max_message_length(max_message_length)
        self._buf = bytearray()
        self._discard = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Frame | FrameTooLarge]:
        """Take bytes from the peer; return the frames they complete, in order.

        ``data`` may be a view of the caller's reusable buffer: nothing here
        keeps a reference to it after returning.
        """
        if self._discard:
            if len(data) <= self._discard:
                self._discard -= len(data)
                return []
            data = data[self._discard :]
            self._discard = 0
        buf = self._buf
        if buf:
            buf += data
            view: Buffer = buf
        else:
            view = data
        frames: list[Frame | FrameTooLarge] = []
        pos = 0
        end = len(view)
        limit = self.max_message_length
        while end - pos >= HEADER_LENGTH:
            length, stream_id, mtype, flags = _unpack_header(view, pos)
            if length > limit:
                frames.append(FrameTooLarge(stream_id, mtype, flags, length))
                pos += HEADER_LENGTH
                available = end - pos
                if available < length:
                    self._discard = length - available
                    pos = end
                    break
                pos += length
                continue
            stop = pos + HEADER_LENGTH + length
            if stop > end:
                break
            frames.append(Frame(stream_id, mtype, flags, bytes(view[pos + HEADER_LENGTH : stop])))
            pos = stop
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += view[pos:]
        return frames


class RequestReceived(_Record):
    """The server got a well-formed request on a new stream.

    ``flags`` are the request's: 0 for a unary call, :data:`FLAG_REMOTE_CLOSED` for a
    server-streaming call, :data:`FLAG_REMOTE_OPEN` when the client goes on sending.
    """

    __slots__ = ("flags", "request", "stream_id")

    def __init__(self, stream_id: int, request: Request, flags: int = 0) -> None:
        self.stream_id = stream_id
        self.request = request
        self.flags = flags


class ResponseReceived(_Record):
    """The client got the response for one of its calls (for a stream: its final status)."""

    __slots__ = ("response", "stream_id")

    def __init__(self, stream_id: int, response: Response) -> None:
        self.stream_id = stream_id
        self.response = response


class CallFailed(_Record):
    """A call cannot complete: its response was oversize or undecodable."""

    __slots__ = ("error", "stream_id")

    def __init__(self, stream_id: int, error: RpcError) -> None:
        self.stream_id = stream_id
        self.error = error


class StreamMessage(_Record):
    """One message on a stream (a Data frame without :data:`FLAG_NO_DATA`).

    The stream's receive buffer counts it until the driver reports it taken
    with ``message_consumed(stream_id, len(payload))``.
    """

    __slots__ = ("payload", "stream_id")

    def __init__(self, stream_id: int, payload: bytes) -> None:
        self.stream_id = stream_id
        self.payload = payload


class StreamEnded(_Record):
    """The peer closed its side of a stream: no more messages will come.

    On a client this ends the call successfully (a server-streaming or bidi
    method sends no Response when OK); on a server the handler's input ends.
    """

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset(_Record):
    """Server side: a protocol error on a live stream was answered here with ``error``.

    The call is over for the client; the driver drops the handler and its output.
    """

    __slots__ = ("error", "stream_id")

    def __init__(self, stream_id: int, error: RpcError) -> None:
        self.stream_id = stream_id
        self.error = error


ClientEvent = ResponseReceived | CallFailed | StreamMessage | StreamEnded
ServerEvent = RequestReceived | StreamMessage | StreamEnded | StreamReset


def _too_large(length: int, limit: int) -> str:
    return f"message length {length} exceeds maximum message size of {limit}"


def _status_response(code: int, message: str) -> bytes:
    return Response(status=Status(code=code, message=message)).SerializeToString()


def check_stream_buffer_size(value: int) -> int:
    """Validate a configured per-stream receive buffer bound (bytes)."""
    if value < 1:
        raise ValueError("stream buffer size must be positive")
    return value


class _Stream:
    """What the core keeps per open stream: which sides are open and what is buffered.

    ``buffered`` counts the messages handed to the driver and not yet taken
    (payload bytes plus :data:`STREAM_MESSAGE_OVERHEAD` each). A stream over
    its bound is *full* until it drains to half of it.
    """

    __slots__ = ("buffered", "full", "local_open", "remote_open")

    def __init__(self, local_open: bool, remote_open: bool) -> None:
        self.local_open = local_open
        self.remote_open = remote_open
        self.buffered = 0
        self.full = False


class _StreamTable:
    """Streams by id and their receive-buffer accounting, shared by both sides."""

    __slots__ = ("_full", "_streams", "stream_buffer_size")

    def __init__(self, stream_buffer_size: int) -> None:
        self.stream_buffer_size = check_stream_buffer_size(stream_buffer_size)
        self._streams: dict[int, _Stream] = {}
        self._full = 0

    def _count(self, stream: _Stream, nbytes: int) -> None:
        stream.buffered += nbytes + STREAM_MESSAGE_OVERHEAD
        if not stream.full and stream.buffered > self.stream_buffer_size:
            stream.full = True
            self._full += 1

    def _drop(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.full:
            self._full -= 1
        return stream

    def message_consumed(self, stream_id: int, nbytes: int) -> None:
        """The application took a message of ``nbytes`` from the stream's buffer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.buffered -= nbytes + STREAM_MESSAGE_OVERHEAD
        if stream.full and stream.buffered <= self.stream_buffer_size // 2:
            stream.full = False
            self._full -= 1

    @property
    def backlogged(self) -> bool:
        """Some stream's buffer is over its bound: the driver should stop reading."""
        return self._full > 0

    def full_streams(self) -> list[int]:
        """The streams over their bound (those a stalled consumer is to blame for)."""
        return [sid for sid, stream in self._streams.items() if stream.full]

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)


class ServerConnection(_StreamTable):
    """Server side of one connection: validates requests, tracks streams, encodes answers.

    :meth:`receive_data` returns the events to act on. Frames that break a
    protocol rule are answered here; the answers wait in :meth:`data_to_send`,
    which the driver must write after each call.
    """

    __slots__ = ("_last_stream_id", "_outbound", "max_message_length", "reader")

    def __init__(
        self,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
    ) -> None:
        super().__init__(stream_buffer_size)
        self.reader = FrameReader(max_message_length)
        self.max_message_length = max_message_length
        self._last_stream_id = 0
        self._outbound = bytearray()

    def receive_data(self, data: Buffer) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        for frame in self.reader.feed(data):
            if type(frame) is FrameTooLarge:
                stream_id = frame.stream_id
                message = _too_large(frame.length, self.max_message_length)
                self._reject(stream_id, Code.RESOURCE_EXHAUSTED, message)
                if self._streams and self._drop(stream_id) is not None:
                    events.append(
                        StreamReset(stream_id, RpcError(Code.RESOURCE_EXHAUSTED, message))
                    )
                continue
            assert type(frame) is Frame
            if frame.type == MESSAGE_TYPE_DATA:
                self._data(frame, events)
                continue
            if frame.type != MESSAGE_TYPE_REQUEST:
                continue  # unknown types are ignored so that newer peers can talk to us
            try:
                request = Request.FromString(frame.payload)
            except DecodeError as exc:
                self._reject(
                    frame.stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"
                )
                continue
            stream_id = frame.stream_id
            if not stream_id & 1:
                self._reject(
                    stream_id,
                    Code.INVALID_ARGUMENT,
                    "StreamID must be odd for client initiated streams",
                )
                continue
            if stream_id <= self._last_stream_id:
                self._reject(
                    stream_id,
                    Code.INVALID_ARGUMENT,
                    f"StreamID {stream_id} must be greater than {self._last_stream_id}",
                )
                continue
            self._last_stream_id = stream_id
            flags = frame.flags
            if flags & (FLAG_REMOTE_CLOSED | FLAG_REMOTE_OPEN):
                # A streaming call: the client may send Data (REMOTE_OPEN) and we may.
                remote_open = flags & FLAG_REMOTE_CLOSED == 0
                self._streams[stream_id] = _Stream(local_open=True, remote_open=remote_open)
            events.append(RequestReceived(stream_id, request, flags))
        return events

    def _data(self, frame: Frame, events: list[ServerEvent]) -> None:
        stream_id = frame.stream_id
        flags = frame.flags
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id & 1 and stream_id <= self._last_stream_id:
                # A stream that existed and is over (or a unary call): its end was answered
                # already. Frames the client sent before it learnt that are dropped.
                return
            self._reject(
                stream_id, Code.INVALID_ARGUMENT, f"ttrpc: data for unknown stream {stream_id}"
            )
            return
        if not stream.remote_open:
            if flags & FLAG_REMOTE_CLOSED and (flags & FLAG_NO_DATA or not frame.payload):
                return  # a second close: nothing to do
            message = f"ttrpc: data after the client closed stream {stream_id}"
            self._drop(stream_id)
            self._reject(stream_id, Code.INVALID_ARGUMENT, message)
            events.append(StreamReset(stream_id, RpcError(Code.INVALID_ARGUMENT, message)))
            return
        if not flags & FLAG_NO_DATA:
            # A closing frame that carries a message too is accepted (Go refuses it; we never
            # send one): the message, then the end.
            payload = frame.payload
            self._count(stream, len(payload))
            events.append(StreamMessage(stream_id, payload))
        if flags & FLAG_REMOTE_CLOSED:
            stream.remote_open = False
            events.append(StreamEnded(stream_id))

    def _reject(self, stream_id: int, code: int, message: str) -> None:
        self._outbound += encode_frame(
            stream_id, MESSAGE_TYPE_RESPONSE, _status_response(code, message)
        )

    def data_to_send(self) -> bytes:
        """Answers queued by :meth:`receive_data` (empty when there are none)."""
        if not self._outbound:
            return b""
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def encode_response(self, stream_id: int, payload: bytes) -> bytes:
        """The frame for a successful call; an oversize payload becomes RESOURCE_EXHAUSTED.

        Also the end of a client-streaming call (its one reply).
        """
        if self._streams:
            self._drop(stream_id)
        body = Response(payload=payload).SerializeToString() if payload else b""
        if len(body) > self.max_message_length:
            return self.encode_error(
                stream_id,
                Status(
                    code=Code.RESOURCE_EXHAUSTED,
                    message=f"response of {len(body)} bytes exceeds maximum message size of "
                    f"{self.max_message_length}",
                ),
            )
        return _pack_header(len(body), stream_id, MESSAGE_TYPE_RESPONSE, 0) + body

    def encode_error(self, stream_id: int, status: Status) -> bytes:
        """The frame for a failed call (unary or streaming)."""
        if self._streams:
            self._drop(stream_id)
        body = Response(status=status).SerializeToString()
        if len(body) > self.max_message_length:
            # Details can make a status too big to send; the code and message still go.
            body = Response(
                status=Status(code=status.code, message=status.message[:1024])
            ).SerializeToString()
        return _pack_header(len(body), stream_id, MESSAGE_TYPE_RESPONSE, 0) + body

    def encode_message(self, stream_id: int, payload: bytes) -> bytes:
        """A Data frame carrying one message of a streaming call's output.

        Raises :class:`RpcError` (RESOURCE_EXHAUSTED) for a message over the limit.
        """
        if len(payload) > self.max_message_length:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, _too_large(len(payload), self.max_message_length)
            )
        return _pack_header(len(payload), stream_id, MESSAGE_TYPE_DATA, 0) + payload

    def encode_end(self, stream_id: int) -> bytes:
        """The successful end of a server-streaming or bidi call: an empty closing Data frame."""
        if self._streams:
            self._drop(stream_id)
        return _pack_header(0, stream_id, MESSAGE_TYPE_DATA, FLAGS_CLOSE)

    def forget_stream(self, stream_id: int) -> None:
        """Drop a stream's state without sending anything (its answer went out otherwise)."""
        self._drop(stream_id)

    def remote_open(self, stream_id: int) -> bool:
        """Whether the client may still send Data on this stream."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.remote_open


class RefusingConnection:
    """Server side of a connection that is not served: every request gets one fixed status.

    What a server speaks to a connection it accepted over its limit: each
    request frame (its header is enough; payloads are skipped unread, so at
    most one header is ever buffered) is answered with ``code`` and
    ``message`` on its stream. :attr:`answered` counts the answers given;
    :attr:`mid_frame` says whether a frame is still arriving (a driver that
    closes the connection waits for the end of the frame, so that the client
    is not writing into a closed socket).
    """

    __slots__ = ("_body", "answered", "reader")

    def __init__(self, code: int, message: str) -> None:
        # A limit of one byte turns every payload into a FrameTooLarge: headers only.
        self.reader = FrameReader(1)
        self._body = _status_response(code, message)
        self.answered = 0

    @property
    def mid_frame(self) -> bool:
        reader = self.reader
        return bool(reader._discard or reader._buf)

    def receive_data(self, data: Buffer) -> bytes:
        """Take bytes from the peer; return the answers to the requests they start."""
        body = self._body
        answers = [
            _pack_header(len(body), frame.stream_id, MESSAGE_TYPE_RESPONSE, 0) + body
            for frame in self.reader.feed(data)
            if frame.type == MESSAGE_TYPE_REQUEST
        ]
        self.answered += len(answers)
        return b"".join(answers)


class ClientConnection(_StreamTable):
    """Client side of one connection: allocates stream ids, matches answers, tracks streams.

    A call the application gave up on is :meth:`abandon`-ed (a stream:
    :meth:`abandon_stream`); its late answers, if any, are dropped.
    """

    __slots__ = ("_next_stream_id", "_pending", "max_message_length", "reader")

    def __init__(
        self,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        stream_buffer_size: int = STREAM_BUFFER_SIZE,
    ) -> None:
        super().__init__(stream_buffer_size)
        self.reader = FrameReader(max_message_length)
        self.max_message_length = max_message_length
        self._next_stream_id = 1
        self._pending: set[int] = set()

    @property
    def pending(self) -> int:
        """Unary calls sent and not yet answered or abandoned."""
        return len(self._pending)

    def _next_id(self) -> int:
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted on this connection"
            )
        self._next_stream_id = stream_id + 2
        return stream_id

    def _check_size(self, length: int) -> None:
        if length > self.max_message_length:
            raise RpcError(Code.RESOURCE_EXHAUSTED, _too_large(length, self.max_message_length))

    def send_request(self, request: Request) -> tuple[int, bytes]:
        """Allocate a stream id and encode ``request``: ``(stream_id, frame)``.

        Raises :class:`RpcError` (RESOURCE_EXHAUSTED) for a request over the
        limit, before any id is used.
        """
        body = request.SerializeToString()
        if len(body) > self.max_message_length:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                _too_large(len(body), self.max_message_length),
            )
        stream_id = self._next_id()
        self._pending.add(stream_id)
        return stream_id, _pack_header(len(body), stream_id, MESSAGE_TYPE_REQUEST, 0) + body

    def open_stream(self, request: Request, *, client_streaming: bool) -> tuple[int, bytes]:
        """Start a streaming call: ``(stream_id, frame)``.

        A client-streaming or bidi call is flagged :data:`FLAG_REMOTE_OPEN` (its
        request carries no payload; messages follow with :meth:`send_message`),
        a server-streaming one :data:`FLAG_REMOTE_CLOSED` (the request carries
        the one message).
        """
        body = request.SerializeToString()
        self._check_size(len(body))
        stream_id = self._next_id()
        flags = FLAG_REMOTE_OPEN if client_streaming else FLAG_REMOTE_CLOSED
        self._streams[stream_id] = _Stream(local_open=client_streaming, remote_open=True)
        return stream_id, _pack_header(len(body), stream_id, MESSAGE_TYPE_REQUEST, flags) + body

    def send_message(self, stream_id: int, payload: bytes) -> bytes:
        """The Data frame for one message on an open stream.

        Raises :class:`RpcError`: FAILED_PRECONDITION when the stream cannot
        send (closed for sending, or finished), RESOURCE_EXHAUSTED over the limit.
        """
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise RpcError(Code.FAILED_PRECONDITION, "ttrpc: send on a closed stream")
        self._check_size(len(payload))
        return _pack_header(len(payload), stream_id, MESSAGE_TYPE_DATA, 0) + payload

    def close_send(self, stream_id: int) -> bytes:
        """The frame closing our side of a stream (empty if it is closed or finished)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            return b""
        stream.local_open = False
        return _pack_header(0, stream_id, MESSAGE_TYPE_DATA, FLAGS_CLOSE)

    def abandon(self, stream_id: int) -> None:
        """Forget a unary call (timed out or cancelled); a late answer will be dropped."""
        self._pending.discard(stream_id)

    def abandon_stream(self, stream_id: int) -> bytes:
        """Forget a stream (cancelled, failed, timed out); its late frames will be dropped.

        Returns the frame closing our side when it was still open, so that the
        server's handler sees the end of its input (the protocol has no cancel).
        """
        stream = self._drop(stream_id)
        if stream is None or not stream.local_open:
            return b""
        return _pack_header(0, stream_id, MESSAGE_TYPE_DATA, FLAGS_CLOSE)

    def receive_data(self, data: Buffer) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        pending = self._pending
        for frame in self.reader.feed(data):
            stream_id = frame.stream_id
            if stream_id not in pending:
                if self._streams:
                    stream = self._streams.get(stream_id)
                    if stream is not None:
                        self._stream_frame(stream_id, frame, events)
                continue  # unknown, or a late answer to a call given up on
            if frame.type != MESSAGE_TYPE_RESPONSE:
                continue  # unknown type (Data is not allowed on a unary call)
            pending.discard(stream_id)
            if type(frame) is FrameTooLarge:
                events.append(
                    CallFailed(
                        stream_id,
                        RpcError(
                            Code.RESOURCE_EXHAUSTED,
                            _too_large(frame.length, self.max_message_length),
                        ),
                    )
                )
                continue
            assert type(frame) is Frame
            try:
                response = Response.FromString(frame.payload)
            except DecodeError as exc:
                events.append(
                    CallFailed(stream_id, RpcError(Code.INTERNAL, f"undecodable response: {exc}"))
                )
                continue
            events.append(ResponseReceived(stream_id, response))
        return events

    def _stream_frame(
        self, stream_id: int, frame: Frame | FrameTooLarge, events: list[ClientEvent]
    ) -> None:
        mtype = frame.type
        if mtype != MESSAGE_TYPE_DATA and mtype != MESSAGE_TYPE_RESPONSE:
            return
        if type(frame) is FrameTooLarge:
            # The stream stays known until the driver abandons it (and closes our side).
            error = RpcError(
                Code.RESOURCE_EXHAUSTED, _too_large(frame.length, self.max_message_length)
            )
            events.append(CallFailed(stream_id, error))
            return
        assert type(frame) is Frame
        if mtype == MESSAGE_TYPE_RESPONSE:
            self._drop(stream_id)
            try:
                response = Response.FromString(frame.payload)
            except DecodeError as exc:
                events.append(
                    CallFailed(stream_id, RpcError(Code.INTERNAL, f"undecodable response: {exc}"))
                )
                return
            events.append(ResponseReceived(stream_id, response))
            return
        flags = frame.flags
        if not flags & FLAG_NO_DATA:
            payload = frame.payload
            self._count(self._streams[stream_id], len(payload))
            events.append(StreamMessage(stream_id, payload))
        if flags & FLAG_REMOTE_CLOSED:
            # The server closes last: its end is the end of the call.
            self._drop(stream_id)
            events.append(StreamEnded(stream_id))
