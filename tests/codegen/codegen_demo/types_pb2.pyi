from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Token(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: str
    def __init__(self, value: _Optional[str] = ...) -> None: ...

class Outer(_message.Message):
    __slots__ = ("inner",)
    class Inner(_message.Message):
        __slots__ = ("count", "label")
        COUNT_FIELD_NUMBER: _ClassVar[int]
        LABEL_FIELD_NUMBER: _ClassVar[int]
        count: int
        label: str
        def __init__(self, count: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...
    INNER_FIELD_NUMBER: _ClassVar[int]
    inner: Outer.Inner
    def __init__(self, inner: _Optional[_Union[Outer.Inner, _Mapping]] = ...) -> None: ...
