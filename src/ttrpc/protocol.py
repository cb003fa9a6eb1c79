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
    "HEADER_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "MESSAGE_TYPE_DATA",
    "MESSAGE_TYPE_REQUEST",
    "MESSAGE_TYPE_RESPONSE",
    "CallFailed",
    "ClientConnection",
    "Frame",
    "FrameReader",
    "FrameTooLarge",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "encode_frame",
]

HEADER_LENGTH = 10
MAX_MESSAGE_LENGTH = 4 << 20
#: Bytes a driver reads from the socket at once (into a buffer it keeps).
READ_SIZE = 64 * 1024
#: The length field is 32 bits, but the first byte must stay zero so peers
#: can tell a ttrpc frame from other traffic; no limit may go beyond this.
PROTOCOL_MAX_MESSAGE_LENGTH = (1 << 24) - 1

MESSAGE_TYPE_REQUEST = 0x1
MESSAGE_TYPE_RESPONSE = 0x2
MESSAGE_TYPE_DATA = 0x3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4

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
    """The server got a well-formed request on a new stream."""

    __slots__ = ("request", "stream_id")

    def __init__(self, stream_id: int, request: Request) -> None:
        self.stream_id = stream_id
        self.request = request


class ResponseReceived(_Record):
    """The client got the response for one of its calls."""

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


ClientEvent = ResponseReceived | CallFailed


def _too_large(length: int, limit: int) -> str:
    return f"message length {length} exceeds maximum message size of {limit}"


def _status_response(code: int, message: str) -> bytes:
    return Response(status=Status(code=code, message=message)).SerializeToString()


class ServerConnection:
    """Server side of one connection: validates requests and encodes responses.

    :meth:`receive_data` returns the requests to dispatch. Requests that break
    a protocol rule are answered here; the answers wait in
    :meth:`data_to_send`, which the driver must write after each call.
    """

    __slots__ = ("_last_stream_id", "_outbound", "max_message_length", "reader")

    def __init__(self, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        self.reader = FrameReader(max_message_length)
        self.max_message_length = max_message_length
        self._last_stream_id = 0
        self._outbound = bytearray()

    def receive_data(self, data: Buffer) -> list[RequestReceived]:
        events: list[RequestReceived] = []
        for frame in self.reader.feed(data):
            if type(frame) is FrameTooLarge:
                self._reject(
                    frame.stream_id,
                    Code.RESOURCE_EXHAUSTED,
                    _too_large(frame.length, self.max_message_length),
                )
                continue
            assert type(frame) is Frame
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
            events.append(RequestReceived(stream_id, request))
        return events

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
        """The frame for a successful call; an oversize payload becomes RESOURCE_EXHAUSTED."""
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
        """The frame for a failed call."""
        body = Response(status=status).SerializeToString()
        if len(body) > self.max_message_length:
            # Details can make a status too big to send; the code and message still go.
            body = Response(
                status=Status(code=status.code, message=status.message[:1024])
            ).SerializeToString()
        return _pack_header(len(body), stream_id, MESSAGE_TYPE_RESPONSE, 0) + body


class ClientConnection:
    """Client side of one connection: allocates stream ids and matches responses.

    A call the application gave up on is :meth:`abandon`-ed; its late
    response, if any, is dropped.
    """

    __slots__ = ("_next_stream_id", "_pending", "max_message_length", "reader")

    def __init__(self, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        self.reader = FrameReader(max_message_length)
        self.max_message_length = max_message_length
        self._next_stream_id = 1
        self._pending: set[int] = set()

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered or abandoned."""
        return len(self._pending)

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
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted on this connection"
            )
        self._next_stream_id = stream_id + 2
        self._pending.add(stream_id)
        return stream_id, _pack_header(len(body), stream_id, MESSAGE_TYPE_REQUEST, 0) + body

    def abandon(self, stream_id: int) -> None:
        """Forget a call (timed out or cancelled); a late answer will be dropped."""
        self._pending.discard(stream_id)

    def receive_data(self, data: Buffer) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        pending = self._pending
        for frame in self.reader.feed(data):
            stream_id = frame.stream_id
            if frame.type != MESSAGE_TYPE_RESPONSE or stream_id not in pending:
                continue  # unknown type, or a late answer to a call given up on
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
