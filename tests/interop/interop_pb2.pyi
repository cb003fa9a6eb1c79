from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("data", "text", "number")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    text: str
    number: int
    def __init__(self, data: _Optional[bytes] = ..., text: _Optional[str] = ..., number: _Optional[int] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("data", "text", "number")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    text: str
    number: int
    def __init__(self, data: _Optional[bytes] = ..., text: _Optional[str] = ..., number: _Optional[int] = ...) -> None: ...

class FailRequest(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[str]] = ...) -> None: ...

class FailResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailDetail(_message.Message):
    __slots__ = ("detail",)
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    detail: str
    def __init__(self, detail: _Optional[str] = ...) -> None: ...

class SleepRequest(_message.Message):
    __slots__ = ("duration_ms", "ignore_deadline")
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    duration_ms: int
    ignore_deadline: bool
    def __init__(self, duration_ms: _Optional[int] = ..., ignore_deadline: _Optional[bool] = ...) -> None: ...

class SleepResponse(_message.Message):
    __slots__ = ("slept_ms",)
    SLEPT_MS_FIELD_NUMBER: _ClassVar[int]
    slept_ms: int
    def __init__(self, slept_ms: _Optional[int] = ...) -> None: ...

class MetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class MetadataResponse(_message.Message):
    __slots__ = ("pairs", "has_deadline", "deadline_remaining_ns")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    HAS_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_REMAINING_NS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[KeyValue]
    has_deadline: bool
    deadline_remaining_ns: int
    def __init__(self, pairs: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., has_deadline: _Optional[bool] = ..., deadline_remaining_ns: _Optional[int] = ...) -> None: ...

class BigRequest(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class BigResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
