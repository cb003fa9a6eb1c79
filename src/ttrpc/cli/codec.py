"""Messages from JSON and to JSON or text: protobuf's JSON mapping and text format.

Requests are always JSON (field names as in the ``.proto`` or in lowerCamelCase,
enums by name or number, ``google.protobuf.Any`` with ``@type``); responses
are JSON (``--format json``) or protobuf text format (``--format text``).
Types inside ``Any`` fields are resolved in the same pool as the method.

For streaming methods :func:`iter_json_lines` reads one request per line and
:func:`format_message` with ``compact=True`` writes one response per line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, cast

from google.protobuf import descriptor_pool, json_format, text_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from ttrpc.cli.errors import EXIT_DATAERR, EXIT_NOINPUT, CliError, one_line

__all__ = [
    "OutputOptions",
    "UnrenderableError",
    "format_message",
    "iter_json_lines",
    "parse_request",
    "parse_value",
    "read_data",
]


@dataclass(frozen=True)
class OutputOptions:
    """How responses are printed."""

    format: str = "json"  # "json" or "text"
    emit_defaults: bool = True  # JSON: print fields that hold their default value
    proto_names: bool = False  # JSON: field names as in the .proto, not lowerCamelCase
    compact: bool = False  # JSON: one line


def read_data(data: str | None, stdin: TextIO) -> str:
    """The request text ``-d`` gives: JSON itself, ``@FILE`` (``@-``) or ``-`` (stdin)."""
    if data is None:
        return ""
    if data == "-" or data == "@-":
        return stdin.read()
    if data.startswith("@"):
        path = data[1:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_NOINPUT) from None
        except UnicodeDecodeError as exc:
            raise CliError(f"{path} is not UTF-8 text: {exc.reason}", EXIT_DATAERR) from None
    return data


def parse_request(
    text: str,
    message_class: type[Message],
    pool: descriptor_pool.DescriptorPool,
    *,
    where: str = "request",
) -> Message:
    """A message of ``message_class`` from JSON text (empty text: the empty message).

    Raises :class:`CliError` (bad data) with one line naming the problem.
    """
    message = message_class()
    if not text.strip():
        return message
    type_name = message.DESCRIPTOR.full_name
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"bad {where} JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", EXIT_DATAERR
        ) from None
    return parse_value(value, message, pool, where=where, type_name=type_name)


def parse_value(
    value: Any,
    message: Message,
    pool: descriptor_pool.DescriptorPool,
    *,
    where: str,
    type_name: str,
) -> Message:
    """Fill ``message`` from a decoded JSON value; raises :class:`CliError`."""
    if not isinstance(value, dict):
        raise CliError(
            f"bad {where}: {type_name} is a JSON object ({{...}}), not {_json_kind(value)}",
            EXIT_DATAERR,
        )
    try:
        json_format.ParseDict(value, message, descriptor_pool=pool)
    except json_format.ParseError as exc:
        raise CliError(f"bad {where} for {type_name}: {_parse_reason(exc)}", EXIT_DATAERR) from None
    return message


def iter_json_lines(
    stream: Iterable[str],
    message_class: type[Message],
    pool: descriptor_pool.DescriptorPool,
) -> Iterator[Message]:
    """One message per non-blank line of ``stream`` (JSON lines), for client streams."""
    for number, line in enumerate(stream, 1):
        if line.strip():
            yield parse_request(line, message_class, pool, where=f"request on line {number}")


def format_message(
    message: Message,
    pool: descriptor_pool.DescriptorPool,
    options: OutputOptions,
) -> str:
    """``message`` as the options say, without a final newline.

    JSON that cannot be produced (an ``Any`` of a type no source knows) falls
    back to text format, which prints such values as raw bytes; a
    :class:`UnrenderableError` says so.
    """
    if options.format == "text":
        return text_format.MessageToString(message, descriptor_pool=pool, as_utf8=True).rstrip("\n")
    try:
        value = json_format.MessageToDict(
            message,
            preserving_proto_field_name=options.proto_names,
            always_print_fields_with_no_presence=options.emit_defaults,
            descriptor_pool=pool,
        )
    except (TypeError, json_format.SerializeToJsonError) as exc:
        raise UnrenderableError(one_line(str(exc))) from None
    value = _in_field_order(value, cast(Descriptor, message.DESCRIPTOR), options.proto_names)
    if options.compact:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(value, ensure_ascii=False, indent=2)


def _in_field_order(value: Any, descriptor: Descriptor, proto_names: bool) -> Any:
    """``value`` (a message as MessageToDict made it) with keys in field-number order.

    MessageToDict lists the fields that are set first and the default ones
    after them; a reader expects the order of the ``.proto``. Well-known types
    have their own JSON forms and are left alone.
    """
    if not isinstance(value, dict) or descriptor.full_name.startswith("google.protobuf."):
        return value
    ordered: dict[str, Any] = {}
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        key = field.name if proto_names else field.json_name
        if key not in value:
            continue
        item = value[key]
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:
            map_value = sub.fields_by_name["value"].message_type
            if map_value is not None and isinstance(item, dict):
                item = {k: _in_field_order(v, map_value, proto_names) for k, v in item.items()}
        elif sub is not None:
            if isinstance(item, list):
                item = [_in_field_order(v, sub, proto_names) for v in item]
            else:
                item = _in_field_order(item, sub, proto_names)
        ordered[key] = item
    for key, item in value.items():  # anything not matched (e.g. extensions) keeps its place
        ordered.setdefault(key, item)
    return ordered


class UnrenderableError(Exception):
    """A message could not be printed as JSON (the reason is the message)."""


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _parse_reason(exc: json_format.ParseError) -> str:
    # json_format appends the list of available fields on a second line: keep it, on this one.
    return one_line(str(exc)).replace("Available Fields(except extensions):", "fields are")
