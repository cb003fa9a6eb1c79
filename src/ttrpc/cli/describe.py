"""``ttrpc describe``: services, methods and message shapes, printed as ``.proto`` source.

The output is proto3-looking source rebuilt from descriptors: type names are
fully qualified (without the leading dot), nested types are printed inside
their message, maps as ``map<K, V>``, oneofs as blocks. For a method or a
message, every message and enum it uses is printed after it (except
``google.protobuf.*`` well-known types).
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from ttrpc.cli.descriptors import MethodRef, Source

__all__ = ["describe", "rpc_line"]

_FDP = descriptor_pb2.FieldDescriptorProto
_INDENT = "  "
# TYPE_INT64 -> "int64", ...
_SCALARS: dict[int, str] = {int(v): n[len("TYPE_") :].lower() for n, v in _FDP.Type.items()}


def describe(
    symbol: ServiceDescriptor | MethodRef | Descriptor | EnumDescriptor, source: Source
) -> str:
    """The description of ``symbol`` (found in ``source``), without a final newline."""
    if isinstance(symbol, ServiceDescriptor):
        return _service(symbol, source)
    if isinstance(symbol, MethodRef):
        header = f"// {symbol.display} ({_origin(source, symbol.service)})"
        kinds = "" if symbol.kind == "unary" else f"\n// {symbol.kind}"
        used = _closure([symbol.descriptor.input_type, symbol.descriptor.output_type])
        parts = [f"{header}{kinds}\n{rpc_line(symbol.descriptor)}"]
        parts.extend(_type_block(t, source) for t in used)
        return "\n\n".join(parts)
    if isinstance(symbol, Descriptor):
        return "\n\n".join(_type_block(t, source) for t in _closure([symbol]))
    return _type_block(symbol, source)


def rpc_line(method: MethodDescriptor) -> str:
    """``rpc Name(pkg.Request) returns (pkg.Response);`` (with ``stream`` where it applies)."""
    request = ("stream " if method.client_streaming else "") + method.input_type.full_name
    response = ("stream " if method.server_streaming else "") + method.output_type.full_name
    return f"rpc {method.name}({request}) returns ({response});"


def _origin(source: Source, full_name: str) -> str:
    where = source.file_of(full_name)
    return f"{where}, built in" if source.builtin else where


def _service(service: ServiceDescriptor, source: Source) -> str:
    lines = [
        f"// {service.full_name} ({_origin(source, service.full_name)})",
        f"service {service.name} {{",
    ]
    lines.extend(_INDENT + rpc_line(method) for method in service.methods)
    lines.append("}")
    return "\n".join(lines)


def _type_block(symbol: Descriptor | EnumDescriptor, source: Source) -> str:
    header = f"// {symbol.full_name} ({_origin(source, symbol.full_name)})"
    if isinstance(symbol, EnumDescriptor):
        return header + "\n" + "\n".join(_enum_lines(symbol, ""))
    return header + "\n" + "\n".join(_message_lines(symbol, ""))


def _outermost(symbol: Descriptor | EnumDescriptor) -> Descriptor | EnumDescriptor:
    """The top-level message a nested type is printed inside (or the type itself)."""
    outer: Descriptor | EnumDescriptor = symbol
    while outer.containing_type is not None:
        outer = outer.containing_type
    return outer


def _closure(roots: Iterable[Descriptor]) -> list[Descriptor | EnumDescriptor]:
    """The roots and every message or enum they use, transitively, once each, in first-use
    order (nested types count as their outermost message; well-known types are left out)."""
    order: list[Descriptor | EnumDescriptor] = []
    seen: set[str] = set()
    pending: list[Descriptor | EnumDescriptor] = list(roots)
    while pending:
        symbol = _outermost(pending.pop(0))
        if symbol.full_name in seen or symbol.full_name.startswith("google.protobuf."):
            continue
        seen.add(symbol.full_name)
        order.append(symbol)
        if isinstance(symbol, Descriptor):
            pending.extend(_used_types(symbol))
    return order


def _used_types(message: Descriptor) -> list[Descriptor | EnumDescriptor]:
    used: list[Descriptor | EnumDescriptor] = []
    for field in message.fields:
        if field.message_type is not None:
            used.append(field.message_type)
        elif field.enum_type is not None:
            used.append(field.enum_type)
    for nested in message.nested_types:
        used.extend(_used_types(nested))
    return used


def _enum_lines(enum: EnumDescriptor, indent: str) -> list[str]:
    lines = [f"{indent}enum {enum.name} {{"]
    lines.extend(f"{indent}{_INDENT}{value.name} = {value.number};" for value in enum.values)
    lines.append(f"{indent}}}")
    return lines


def _message_lines(message: Descriptor, indent: str) -> list[str]:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    syntax = _syntax(message)
    inner = indent + _INDENT
    lines = [f"{indent}message {message.name} {{"]
    maps = {nested.name: nested for nested in message.nested_types if nested.GetOptions().map_entry}
    printed_oneofs: set[int] = set()
    for field in proto.field:
        real_oneof = field.HasField("oneof_index") and not field.proto3_optional
        if real_oneof:
            if field.oneof_index in printed_oneofs:
                continue
            printed_oneofs.add(field.oneof_index)
            lines.append(f"{inner}oneof {proto.oneof_decl[field.oneof_index].name} {{")
            lines.extend(
                f"{inner}{_INDENT}{_field_text(member, syntax, maps)}"
                for member in proto.field
                if member.HasField("oneof_index")
                and member.oneof_index == field.oneof_index
                and not member.proto3_optional
            )
            lines.append(f"{inner}}}")
        else:
            lines.append(f"{inner}{_field_text(field, syntax, maps)}")
    for nested in message.nested_types:
        if nested.name not in maps:
            lines.extend(_message_lines(nested, inner))
    for nested_enum in message.enum_types:
        lines.extend(_enum_lines(nested_enum, inner))
    lines.append(f"{indent}}}")
    return lines


def _syntax(message: Descriptor) -> str:
    """``proto2``, ``proto3`` or ``editions``: what the message's file declares."""
    file = descriptor_pb2.FileDescriptorProto()
    message.file.CopyToProto(file)
    return file.syntax or "proto2"


def _field_text(
    field: descriptor_pb2.FieldDescriptorProto, syntax: str, maps: dict[str, Descriptor]
) -> str:
    type_name = field.type_name.lstrip(".")
    entry = maps.get(type_name.rpartition(".")[2]) if field.type == _FDP.TYPE_MESSAGE else None
    if entry is not None and type_name == entry.full_name:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        key_type = _scalar_or_named(key.type, key.message_type or key.enum_type)
        value_type = _scalar_or_named(value.type, value.message_type or value.enum_type)
        return f"map<{key_type}, {value_type}> {field.name} = {field.number};"
    if field.type in (_FDP.TYPE_MESSAGE, _FDP.TYPE_ENUM, _FDP.TYPE_GROUP):
        kind = type_name
    else:
        kind = _SCALARS.get(field.type, "?")
    if field.label == _FDP.LABEL_REPEATED:
        label = "repeated "
    elif field.label == _FDP.LABEL_REQUIRED:
        label = "required "
    elif field.proto3_optional or (syntax == "proto2" and not field.HasField("oneof_index")):
        label = "optional "
    else:
        label = ""
    return f"{label}{kind} {field.name} = {field.number};"


def _scalar_or_named(field_type: int, named: Descriptor | EnumDescriptor | None) -> str:
    if named is not None:
        return named.full_name
    return _SCALARS.get(field_type, "?")
