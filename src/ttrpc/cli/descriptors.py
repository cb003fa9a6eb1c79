"""Where service descriptions come from, and finding methods and types in them.

Three sources, searched in this order:

1. ``--proto FILE`` (with ``-I DIR``): compiled by grpcio-tools' protoc, the
   one ``python -m ttrpc.protoc`` uses, into a descriptor set;
2. ``--descriptor-set FILE``: a ``FileDescriptorSet`` (``protoc -o FILE
   --include_imports``, ``buf build -o FILE``);
3. containerd's services, built in (:mod:`ttrpc.cli.builtin`).

The user's files share one private :class:`DescriptorPool` and the built-in
ones another, so neither clashes with the other nor with whatever the
process's default pool holds: a user may load containerd's original protos
next to the built-in copies.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import DecodeError, Message

from ttrpc.cli.errors import (
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    one_line,
)

__all__ = ["Descriptors", "MethodRef", "Source", "compile_protos", "split_method"]

# Well-known types a descriptor set may import without including them.
_WELL_KNOWN_MODULES = (
    "google.protobuf.any_pb2",
    "google.protobuf.api_pb2",
    "google.protobuf.descriptor_pb2",
    "google.protobuf.duration_pb2",
    "google.protobuf.empty_pb2",
    "google.protobuf.field_mask_pb2",
    "google.protobuf.source_context_pb2",
    "google.protobuf.struct_pb2",
    "google.protobuf.timestamp_pb2",
    "google.protobuf.type_pb2",
    "google.protobuf.wrappers_pb2",
)

_PROTOC_TIMEOUT = 120.0


@dataclass
class Source:
    """One pool of descriptors and the files loaded into it."""

    name: str  # "built in", or what the user gave
    pool: descriptor_pool.DescriptorPool
    files: list[descriptor_pb2.FileDescriptorProto] = field(default_factory=list)
    builtin: bool = False

    def service_names(self) -> list[str]:
        """Full names of the services its files declare, in file order."""
        return [
            f"{file.package}.{service.name}" if file.package else service.name
            for file in self.files
            for service in file.service
        ]

    def file_of(self, full_name: str) -> str:
        """The file that declares ``full_name`` (for headers in ``describe``)."""
        try:
            return self.pool.FindFileContainingSymbol(full_name).name
        except KeyError:
            return "?"


@dataclass(frozen=True)
class MethodRef:
    """A method found in one of the sources, with what a call needs."""

    service: str  # full service name, as sent on the wire
    descriptor: MethodDescriptor
    source: Source

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def display(self) -> str:
        """``service/Method``: the form the command line takes."""
        return f"{self.service}/{self.descriptor.name}"

    @property
    def kind(self) -> str:
        """``unary``, ``server-streaming``, ``client-streaming`` or ``bidi-streaming``."""
        client = self.descriptor.client_streaming
        server = self.descriptor.server_streaming
        if client and server:
            return "bidi-streaming"
        if client:
            return "client-streaming"
        if server:
            return "server-streaming"
        return "unary"

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.output_type)


def split_method(spec: str) -> tuple[str, str]:
    """``(service, method)`` from ``pkg.Service/Method``, ``/pkg.Service/Method`` or
    ``pkg.Service.Method``.

    Raises :class:`CliError` (usage) for anything else.
    """
    text = spec.strip().lstrip("/")
    if "/" in text:
        service, _, method = text.rpartition("/")
    else:
        service, _, method = text.rpartition(".")
    if not service or not method or "/" in service:
        raise CliError(
            f"invalid method {spec!r}: expected SERVICE/METHOD, e.g. {_EXAMPLE_METHOD}", EXIT_USAGE
        )
    return service, method


_EXAMPLE_METHOD = "containerd.task.v2.Task/State"


class Descriptors:
    """The user's descriptors (if any), then the built-in ones (loaded on first use)."""

    def __init__(
        self,
        protos: Sequence[str] = (),
        include_dirs: Sequence[str] = (),
        descriptor_sets: Sequence[str] = (),
        *,
        builtin: bool = True,
    ) -> None:
        self._user: Source | None = None
        self._builtin: Source | None = None
        self._use_builtin = builtin
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        names: list[str] = []
        if protos:
            names.append(", ".join(protos))
            for file in compile_protos(protos, include_dirs).file:
                files.setdefault(file.name, file)
        for path in descriptor_sets:
            names.append(path)
            for file in load_descriptor_set(path).file:
                files.setdefault(file.name, file)
        if files:
            self._user = Source(" + ".join(names), descriptor_pool.DescriptorPool())
            _add_files(self._user, files, self._user.name)

    # -- sources -------------------------------------------------------------

    def sources(self) -> Iterator[Source]:
        """The sources in search order (building the built-in one if it is needed now)."""
        if self._user is not None:
            yield self._user
        if self._use_builtin:
            yield self.builtin()

    def builtin(self) -> Source:
        """The built-in containerd services."""
        if self._builtin is None:
            from ttrpc.cli.builtin import builtin_files

            source = Source("built in", descriptor_pool.DescriptorPool(), builtin=True)
            _add_files(source, {f.name: f for f in builtin_files()}, "built-in descriptors")
            self._builtin = source
        return self._builtin

    def service_names(self) -> list[str]:
        """Every service that can be called, each once (a user's service hides a built-in one)."""
        names: list[str] = []
        for source in self.sources():
            names.extend(n for n in source.service_names() if n not in names)
        return names

    # -- look-ups ------------------------------------------------------------

    def find_service(self, name: str) -> tuple[ServiceDescriptor, Source]:
        """The service ``name``; raises :class:`CliError` (usage) with suggestions."""
        name = name.strip().lstrip(".")
        for source in self.sources():
            try:
                return source.pool.FindServiceByName(name), source
            except KeyError:
                continue
        known = self.service_names()
        hint = _suggest(name, known)
        if not hint:
            hint = " (give its .proto with --proto FILE -I DIR, or --descriptor-set FILE)"
        raise CliError(f"unknown service {name!r}{hint}", EXIT_USAGE)

    def find_method(self, spec: str) -> MethodRef:
        """The method ``spec`` names (see :func:`split_method`); raises :class:`CliError`."""
        service_name, method_name = split_method(spec)
        service, source = self.find_service(service_name)
        method = service.methods_by_name.get(method_name)
        if method is None:
            names = [m.name for m in service.methods]
            hint = _suggest(method_name, names) or f" (it has: {', '.join(names)})"
            raise CliError(
                f"unknown method {method_name!r} in service {service.full_name}{hint}", EXIT_USAGE
            )
        return MethodRef(service.full_name, method, source)

    def find_symbol(
        self, name: str
    ) -> tuple[ServiceDescriptor | MethodRef | Descriptor | EnumDescriptor, Source]:
        """A service, method, message or enum by full name; raises :class:`CliError`."""
        text = name.strip().lstrip("./")
        if "/" in text:
            ref = self.find_method(text)
            return ref, ref.source
        for source in self.sources():
            pool = source.pool
            for find in (
                pool.FindServiceByName,
                pool.FindMessageTypeByName,
                pool.FindEnumTypeByName,
            ):
                try:
                    return find(text), source
                except KeyError:
                    continue
            service_name, _, method_name = text.rpartition(".")
            try:
                service = pool.FindServiceByName(service_name)
            except KeyError:
                continue
            method = service.methods_by_name.get(method_name)
            if method is not None:
                return MethodRef(service.full_name, method, source), source
        hint = _suggest(text, self.service_names())
        raise CliError(f"unknown service, method or type {name!r}{hint}", EXIT_USAGE)


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# -- loading -----------------------------------------------------------------


def compile_protos(
    protos: Sequence[str], include_dirs: Sequence[str]
) -> descriptor_pb2.FileDescriptorSet:
    """Compile ``.proto`` files with grpcio-tools' protoc into a descriptor set (imports included).

    Without include directories, each file's own directory is one (protoc would
    only search ``.``). Raises :class:`CliError` for missing files, a missing
    protoc and compile errors (protoc's messages, on one line).
    """
    for path in (*protos, *include_dirs):
        if not os.path.exists(path):
            raise CliError(f"cannot read {path}: no such file or directory", EXIT_NOINPUT)
    if importlib.util.find_spec("grpc_tools") is None:
        raise CliError(
            "--proto needs protoc from grpcio-tools (pip install 'ttrpc[codegen]'), "
            "or give a compiled --descriptor-set",
            EXIT_UNAVAILABLE,
        )
    includes = list(include_dirs) or list(dict.fromkeys(os.path.dirname(p) or "." for p in protos))
    with tempfile.TemporaryDirectory(prefix="ttrpc-cli-") as tmp:
        out = os.path.join(tmp, "set.pb")
        # grpc_tools.protoc run as a module adds the well-known types to the include path.
        argv = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"-I{d}" for d in includes),
            f"--descriptor_set_out={out}",
            "--include_imports",
            *protos,
        ]
        try:
            run = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=_PROTOC_TIMEOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CliError(f"protoc took over {_PROTOC_TIMEOUT:.0f}s", EXIT_DATAERR) from None
        if run.returncode != 0 or not os.path.exists(out):
            reason = "; ".join(
                line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()
            )
            raise CliError(
                f"cannot compile {', '.join(protos)}: {reason or f'protoc exit {run.returncode}'}",
                EXIT_DATAERR,
            )
        with open(out, "rb") as f:
            return descriptor_pb2.FileDescriptorSet.FromString(f.read())


def load_descriptor_set(path: str) -> descriptor_pb2.FileDescriptorSet:
    """Read a binary ``FileDescriptorSet``; raises :class:`CliError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_NOINPUT) from None
    try:
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError:
        raise CliError(
            f"{path} is not a FileDescriptorSet (make one with protoc -o FILE --include_imports)",
            EXIT_DATAERR,
        ) from None
    if not fds.file:
        raise CliError(f"{path} holds no files: it is not a FileDescriptorSet", EXIT_DATAERR)
    return fds


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    if not name.startswith("google/protobuf/"):
        return None
    for module in _WELL_KNOWN_MODULES:
        importlib.import_module(module)
    try:
        file = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _add_files(
    source: Source, files: dict[str, descriptor_pb2.FileDescriptorProto], origin: str
) -> None:
    """Add ``files`` to ``source`` (dependencies first); raises :class:`CliError`."""
    done: set[str] = set()
    visiting: set[str] = set()

    def add(name: str, importer: str | None) -> None:
        if name in done:
            return
        if name in visiting:
            raise CliError(f"{origin}: import cycle through {name}", EXIT_DATAERR)
        file = files.get(name) or _well_known(name)
        if file is None:
            raise CliError(
                f"{origin}: {importer} imports {name}, which is missing "
                "(build the set with --include_imports)",
                EXIT_DATAERR,
            )
        visiting.add(name)
        for dependency in file.dependency:
            add(dependency, name)
        visiting.discard(name)
        try:
            source.pool.Add(file)
        except Exception as exc:  # the pool's own error types differ between backends
            raise CliError(
                f"{origin}: cannot load {name}: {one_line(str(exc))}", EXIT_DATAERR
            ) from None
        source.files.append(file)
        done.add(name)

    for name in files:
        add(name, None)
