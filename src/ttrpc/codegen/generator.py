"""Turn protobuf service descriptors into ttrpc Python modules.

This is the whole of ``protoc-gen-ttrpc`` except its stdin/stdout plumbing
(:mod:`ttrpc.codegen.plugin`), so it can be driven directly::

    response = generate(code_generator_request)

For every ``service`` of a ``.proto`` file the module gets four classes:
``<Name>Service`` (asyncio server base), ``<Name>BlockingService`` (blocking
server base), ``<Name>Client`` and ``<Name>BlockingClient``. The module sits
where protoc's Python generator puts the ``_pb2`` module, with ``_ttrpc``
instead of ``_pb2``.

Streaming methods get typed signatures of their kind (``requests`` is an
iterator of requests, async on asyncio): server-streaming ``(request, ctx) ->
iterator of responses``; client-streaming ``(requests, ctx) -> response``;
bidi ``(requests, ctx) -> iterator of responses``. Clients return
``ClientStream`` objects for the kinds that answer with a stream.
"""

from __future__ import annotations

import keyword
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

__all__ = [
    "GeneratorError",
    "generate",
    "generate_module",
    "module_name",
    "output_path",
]

LINE_LENGTH = 100
_INDENT = "    "

# SourceCodeInfo paths: FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2.
_SERVICE_FIELD = 6
_METHOD_FIELD = 2

# Names a generated class defines or reads in its body; a method must not shadow them
# (mypy resolves annotations in the class scope first).
_CLASS_RESERVED = frozenset({"SERVICE_NAME", "__init__", "__ttrpc_service__", "_client", "ttrpc"})
_RUNTIME_NAMES = ("Code", "Context", "Method", "RpcError", "Service")


class GeneratorError(Exception):
    """A ``.proto`` file that cannot be turned into a ttrpc module."""


def module_name(proto_path: str, suffix: str = "_pb2") -> str:
    """The Python module protoc generates for a ``.proto`` path.

    Follows protoc's own rule: ``a/b/foo-bar.proto`` gives ``a.b.foo_bar_pb2``.
    """
    for ext in (".protodevel", ".proto"):
        if proto_path.endswith(ext):
            proto_path = proto_path[: -len(ext)]
            break
    return proto_path.replace("-", "_").replace("/", ".") + suffix


def output_path(proto_path: str) -> str:
    """Where the module for a ``.proto`` path goes: ``a/b/foo.proto`` → ``a/b/foo_ttrpc.py``."""
    return module_name(proto_path, "_ttrpc").replace(".", "/") + ".py"


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    """Answer a protoc plugin request: one ``_ttrpc.py`` per requested file with services.

    Problems are reported in ``response.error`` (protoc prints them), never raised.
    """
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=(
            plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
            | plugin_pb2.CodeGeneratorResponse.FEATURE_SUPPORTS_EDITIONS
        ),
        # Only service shapes are read, so every edition protoc knows is fine.
        minimum_edition=descriptor_pb2.EDITION_PROTO2,
        maximum_edition=descriptor_pb2.EDITION_2024,
    )
    if request.parameter:
        response.error = f"protoc-gen-ttrpc takes no options (got {request.parameter!r})"
        return response
    files = {f.name: f for f in request.proto_file}
    types = _TypeIndex(request.proto_file)
    for name in request.file_to_generate:
        proto = files.get(name)
        if proto is None:
            response.error = f"{name}: not among the request's proto files"
            break
        if not proto.service:
            continue
        try:
            content = generate_module(proto, types)
        except GeneratorError as exc:
            response.error = f"{name}: {exc}"
            break
        response.file.add(name=output_path(name), content=content)
    if response.error:
        del response.file[:]
    return response


def generate_module(
    proto: descriptor_pb2.FileDescriptorProto,
    types: _TypeIndex | Iterable[descriptor_pb2.FileDescriptorProto],
) -> str:
    """The source of the ttrpc module for one file.

    ``types`` must cover every message the file's methods use: a type index or the
    file descriptors themselves (``proto`` and its dependencies).
    """
    if not isinstance(types, _TypeIndex):
        types = _TypeIndex(types)
    return _ModuleWriter(proto, types).render()


# -- types and imports -------------------------------------------------------


@dataclass(frozen=True)
class _MessageRef:
    file: str  # the .proto that defines the message
    path: str  # its name inside the _pb2 module, e.g. "Outer.Inner"


class _TypeIndex:
    """Where each message type (by full name) lives."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self._refs: dict[str, _MessageRef] = {}
        for proto in files:
            prefix = f".{proto.package}." if proto.package else "."
            self._add(proto.name, prefix, "", proto.message_type)

    def _add(
        self,
        file: str,
        prefix: str,
        outer: str,
        messages: Iterable[descriptor_pb2.DescriptorProto],
    ) -> None:
        for message in messages:
            path = f"{outer}.{message.name}" if outer else message.name
            self._refs[prefix + path] = _MessageRef(file, path)
            self._add(file, prefix, path, message.nested_type)

    def lookup(self, full_name: str) -> _MessageRef:
        try:
            return self._refs[full_name]
        except KeyError:
            raise GeneratorError(
                f"message type {full_name} is not defined in the request"
            ) from None


def _check_module_path(module: str) -> None:
    for part in module.split("."):
        if not part.isidentifier() or keyword.iskeyword(part):
            raise GeneratorError(
                f"cannot import {module}: {part!r} is not a Python identifier "
                "(rename the .proto file or its directory)"
            )


def _alias_modules(modules: Iterable[str]) -> dict[str, str]:
    """A local name per module: its last component, or protoc's escaped full name on a clash."""
    modules = sorted(set(modules))
    counts: dict[str, int] = {}
    for module in modules:
        base = module.rpartition(".")[2]
        counts[base] = counts.get(base, 0) + 1
    aliases = {}
    for module in modules:
        base = module.rpartition(".")[2]
        aliases[module] = base if counts[base] == 1 else _escape_module(module)
    return aliases


def _escape_module(module: str) -> str:
    # The same injective escaping protoc uses for its own import aliases.
    return module.replace("_", "__").replace(".", "_dot_")


def _import_lines(aliases: dict[str, str]) -> list[str]:
    """Import statements in the order isort/ruff want them inside one section."""
    straight: list[str] = []
    from_members: dict[str, list[str]] = {}
    from_aliased: list[tuple[str, str]] = []
    for module, alias in aliases.items():
        package, _, base = module.rpartition(".")
        if not package:
            straight.append(base if alias == base else f"{base} as {alias}")
        elif alias == base:
            from_members.setdefault(package, []).append(base)
        else:
            from_aliased.append((package, f"{base} as {alias}"))

    lines = [f"import {name}" for name in sorted(straight, key=_sort_key)]
    statements: list[tuple[str, list[str]]] = []
    for package, members in from_members.items():
        statements.append((package, sorted(members, key=_member_key)))
    for package, member in from_aliased:
        statements.append((package, [member]))
    statements.sort(key=lambda item: (_sort_key(item[0]), _member_key(item[1][0])))
    for package, members in statements:
        one_line = f"from {package} import {', '.join(members)}"
        if len(one_line) <= LINE_LENGTH:
            lines.append(one_line)
        else:
            lines.append(f"from {package} import (")
            lines.extend(f"{_INDENT}{member}," for member in members)
            lines.append(")")
    return lines


def _sort_key(name: str) -> tuple[str, str]:
    return (name.lower(), name)


def _member_key(name: str) -> tuple[int, str, str]:
    # isort's order-by-type: CONSTANTS, then Classes, then everything else.
    if name.isupper() and len(name) > 1:
        kind = 0
    elif name[:1].isupper():
        kind = 1
    else:
        kind = 2
    return (kind, name.lower(), name)


# -- docstrings --------------------------------------------------------------


def _comment_lines(location: descriptor_pb2.SourceCodeInfo.Location | None) -> list[str]:
    if location is None or not location.leading_comments:
        return []
    text = textwrap.dedent(location.leading_comments.expandtabs(8))
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _docstring(lines: Sequence[str], indent: str) -> list[str]:
    """A docstring statement at ``indent``, wrapped to the line length."""
    width = LINE_LENGTH - len(indent) - len('"""')
    wrapped: list[str] = []
    for line in lines:
        if len(line) <= width:
            wrapped.append(line)
            continue
        lead = line[: len(line) - len(line.lstrip())]
        wrapped.extend(
            textwrap.wrap(
                line,
                width,
                initial_indent="",
                subsequent_indent=lead,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    escaped = _escape_docstring("\n".join(wrapped)).split("\n")
    if len(escaped) == 1 and len(indent) + len(escaped[0]) + 6 <= LINE_LENGTH:
        return [f'{indent}"""{escaped[0]}"""']
    out = [f'{indent}"""{escaped[0]}']
    out.extend(f"{indent}{line}" if line else "" for line in escaped[1:])
    out.append(f'{indent}"""')
    return out


def _escape_docstring(text: str) -> str:
    """Make ``text`` safe between triple quotes, escaping as little as possible."""
    text = text.replace("\\", "\\\\")
    # Only a run of three quotes, or quotes touching the closing ones, would end the string.
    return re.sub(r'"{3,}|"+\Z', lambda run: '\\"' * len(run.group()), text)


# -- layout helpers ----------------------------------------------------------


def _call(indent: str, head: str, args: Sequence[str], tail: str) -> list[str]:
    """``head(args)tail`` laid out the way black/ruff-format would."""
    one_line = f"{indent}{head}{', '.join(args)}{tail}"
    if len(one_line) <= LINE_LENGTH:
        return [one_line]
    inner = indent + _INDENT
    joined = f"{inner}{', '.join(args)}"
    if len(joined) <= LINE_LENGTH:
        return [f"{indent}{head}", joined, f"{indent}{tail}"]
    return [f"{indent}{head}", *(f"{inner}{arg}," for arg in args), f"{indent}{tail}"]


def _def(indent: str, prefix: str, params: Sequence[str], returns: str) -> list[str]:
    """A ``def`` line (``prefix`` is e.g. ``async def Echo(``) laid out like ruff-format."""
    return _call(indent, prefix, params, f") -> {returns}:")


# -- the module --------------------------------------------------------------


@dataclass(frozen=True)
class _Rpc:
    wire_name: str
    py_name: str
    request: str  # expression naming the request class, e.g. "interop_pb2.EchoRequest"
    response: str
    doc: list[str]
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming


@dataclass(frozen=True)
class _Flavour:
    """One of the four classes generated per service."""

    suffix: str
    server: bool
    blocking: bool

    @property
    def package(self) -> str:
        return "ttrpc.blocking" if self.blocking else "ttrpc.aio"


_FLAVOURS = (
    _Flavour("Service", server=True, blocking=False),
    _Flavour("BlockingService", server=True, blocking=True),
    _Flavour("Client", server=False, blocking=False),
    _Flavour("BlockingClient", server=False, blocking=True),
)


class _ModuleWriter:
    def __init__(self, proto: descriptor_pb2.FileDescriptorProto, types: _TypeIndex) -> None:
        self.proto = proto
        self.types = types
        self.locations = {
            tuple(location.path): location for location in proto.source_code_info.location
        }
        refs = [
            types.lookup(name)
            for service in proto.service
            for method in service.method
            for name in (method.input_type, method.output_type)
        ]
        modules = {module_name(ref.file) for ref in refs}
        for module in modules:
            _check_module_path(module)
        self.aliases = _alias_modules(modules)
        self._check_class_names()

    def _check_class_names(self) -> None:
        seen: dict[str, str] = {}
        for service in self.proto.service:
            for flavour in _FLAVOURS:
                class_name = service.name + flavour.suffix
                if class_name in seen:
                    raise GeneratorError(
                        f"services {seen[class_name]} and {service.name} would both "
                        f"generate class {class_name}"
                    )
                seen[class_name] = service.name

    def _message(self, full_name: str) -> str:
        ref = self.types.lookup(full_name)
        return f"{self.aliases[module_name(ref.file)]}.{ref.path}"

    def _methods(self, index: int, service: descriptor_pb2.ServiceDescriptorProto) -> list[_Rpc]:
        taken = set(_CLASS_RESERVED) | set(_RUNTIME_NAMES) | set(self.aliases.values())
        # Names usable as they are are claimed first, so a rename never depends on order.
        plain = {
            m.name for m in service.method if m.name not in taken and not keyword.iskeyword(m.name)
        }
        used = set(plain)
        out: list[_Rpc] = []
        for i, method in enumerate(service.method):
            py_name = method.name
            if py_name not in plain:
                while py_name in taken or py_name in used or keyword.iskeyword(py_name):
                    py_name += "_"
                used.add(py_name)
            location = self.locations.get((_SERVICE_FIELD, index, _METHOD_FIELD, i))
            out.append(
                _Rpc(
                    wire_name=method.name,
                    py_name=py_name,
                    request=self._message(method.input_type),
                    response=self._message(method.output_type),
                    doc=_comment_lines(location),
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                )
            )
        return out

    def render(self) -> str:
        proto = self.proto
        services: list[tuple[str, str, list[str], list[_Rpc]]] = []
        for index, service in enumerate(proto.service):
            full = f"{proto.package}.{service.name}" if proto.package else service.name
            doc = _comment_lines(self.locations.get((_SERVICE_FIELD, index)))
            services.append((service.name, full, doc, self._methods(index, service)))
        has_rpcs = any(methods for *_, methods in services)
        # Without methods only Service is used, and unused imports fail linters.
        runtime = _RUNTIME_NAMES if has_rpcs else ("Service",)
        has_streams = any(m.streaming for *_, methods in services for m in methods)
        has_inputs = any(m.client_streaming for *_, methods in services for m in methods)

        package = f" (package {proto.package})" if proto.package else ""
        docstring = f'"""ttrpc services of {proto.name}{package}."""'
        if len(docstring) > LINE_LENGTH:
            docstring = '"""ttrpc services (generated)."""'
        lines = [
            "# Generated by protoc-gen-ttrpc. DO NOT EDIT.",
            f"# source: {proto.name}",
            docstring,
            "",
            "from __future__ import annotations",
            "",
            "from typing import TYPE_CHECKING",
            "",
            f"from ttrpc import {', '.join(runtime)}",
            "",
            "if TYPE_CHECKING:",
        ]
        if has_streams:
            # Only files with streaming methods need these (unary-only output is unchanged).
            abc = "AsyncIterator, Iterable, Iterator" if has_inputs else "AsyncIterator, Iterator"
            lines.extend([f"{_INDENT}from collections.abc import {abc}", ""])
        lines.extend([f"{_INDENT}import ttrpc.aio", f"{_INDENT}import ttrpc.blocking"])
        # The _pb2 imports form their own block: where isort files them (first or third
        # party) depends on the project using the code, unlike ttrpc's own import above.
        if self.aliases:
            lines.append("")
            lines.extend(_import_lines(self.aliases))
        for name, full, doc, methods in services:
            for flavour in _FLAVOURS:
                lines.extend(["", ""])
                lines.extend(self._class(flavour, name + flavour.suffix, full, doc, methods))
        return "\n".join(lines) + "\n"

    def _class(
        self,
        flavour: _Flavour,
        class_name: str,
        full: str,
        doc: list[str],
        methods: list[_Rpc],
    ) -> list[str]:
        blocking, server = flavour.blocking, flavour.server
        if server:
            role = [
                f"Serves {full} on a ``{flavour.package}.Server``.",
                "",
                "Subclass it and override the methods you implement (the others answer",
                "UNIMPLEMENTED), then pass an instance to ``server.register``.",
            ]
        else:
            role = [f"Calls {full} through a ``{flavour.package}.Client``."]
        summary = [*doc, "", *role] if doc else role

        i1, i2 = _INDENT, _INDENT * 2
        out = [f"class {class_name}:"]
        out.extend(_docstring(summary, i1))
        out.extend(["", f'{i1}SERVICE_NAME = "{full}"'])
        if not server:
            out.extend(
                [
                    "",
                    f"{i1}def __init__(self, client: {flavour.package}.Client) -> None:",
                    f"{i2}self._client = client",
                ]
            )
        for method in methods:
            out.append("")
            if method.streaming:
                out.extend(self._stream_method(flavour, method))
                continue
            prefix = "def" if blocking else "async def"
            params = ["self", f"request: {method.request}", "ctx: Context | None = None"]
            out.extend(_def(i1, f"{prefix} {method.py_name}(", params, method.response))
            if method.doc:
                out.extend(_docstring(method.doc, i2))
            if server:
                message = f'"method {method.wire_name} not implemented"'
                out.extend(_call(i2, "raise RpcError(", ["Code.UNIMPLEMENTED", message], ")"))
            else:
                call = (
                    "return self._client.call(" if blocking else "return await self._client.call("
                )
                wire = f'"{method.wire_name}"'
                args = ["self.SERVICE_NAME", wire, "request", method.response, "ctx"]
                out.extend(_call(i2, call, args, ")"))
        if server:
            out.extend(self._service_table(methods))
        return out

    def _stream_method(self, flavour: _Flavour, method: _Rpc) -> list[str]:
        """A streaming method of one of the four classes."""
        i1, i2 = _INDENT, _INDENT * 2
        blocking, server = flavour.blocking, flavour.server
        req, resp = method.request, method.response
        ctx = "ctx: Context | None = None"
        package = flavour.package
        if server:
            inputs = f"Iterator[{req}]" if blocking else f"AsyncIterator[{req}]"
            outputs = f"Iterator[{resp}]" if blocking else f"AsyncIterator[{resp}]"
            first = f"request: {req}" if not method.client_streaming else f"requests: {inputs}"
            returns = outputs if method.server_streaming else resp
            # A coroutine for client-streaming (it returns one reply); a plain def for the
            # others, which subclasses override with (async) generators.
            is_async = not blocking and not method.server_streaming
        else:
            inputs = f"Iterable[{req}]" if blocking else f"ttrpc.aio.Requests[{req}]"
            if not method.client_streaming:
                first = f"request: {req}"
            elif method.server_streaming:
                first = f"requests: {inputs} | None = None"
            else:
                first = f"requests: {inputs}"
            returns = f"{package}.ClientStream[{resp}]" if method.server_streaming else resp
            is_async = not blocking and not method.server_streaming
        prefix = "async def" if is_async else "def"
        out = _def(i1, f"{prefix} {method.py_name}(", ["self", first, ctx], returns)
        if method.doc:
            out.extend(_docstring(method.doc, i2))
        if server:
            message = f'"method {method.wire_name} not implemented"'
            out.extend(_call(i2, "raise RpcError(", ["Code.UNIMPLEMENTED", message], ")"))
            return out
        wire = f'"{method.wire_name}"'
        if not method.client_streaming:
            helper, arg = "server_stream", "request"
        elif method.server_streaming:
            helper, arg = "bidi_stream", "requests"
        else:
            helper, arg = "client_stream", "requests"
        head = f"return {'await ' if is_async else ''}self._client.{helper}("
        out.extend(_call(i2, head, ["self.SERVICE_NAME", wire, arg, resp, "ctx"], ")"))
        return out

    def _service_table(self, methods: list[_Rpc]) -> list[str]:
        i1, i2, i3, i4 = (_INDENT * n for n in range(1, 5))
        out = [
            "",
            f"{i1}def __ttrpc_service__(self) -> Service:",
            f'{i2}"""Describe this object\'s handlers for ``Server.register``."""',
        ]
        rpcs = methods
        if not rpcs:
            out.append(f"{i2}return Service(self.SERVICE_NAME, {{}})")
            return out
        out.extend([f"{i2}return Service(", f"{i3}self.SERVICE_NAME,", f"{i3}{{"])
        for rpc in rpcs:
            args = [f'"{rpc.wire_name}"', rpc.request, rpc.response, f"self.{rpc.py_name}"]
            if rpc.client_streaming:
                args.append("client_streaming=True")
            if rpc.server_streaming:
                args.append("server_streaming=True")
            out.extend(_call(i4, f'"{rpc.wire_name}": Method(', args, "),"))
        out.extend([f"{i3}}},", f"{i2})"])
        return out
