"""``ttrpc call``: one call to any ttrpc server, request and response as JSON.

The method's kind picks the runner. Unary calls go through
:meth:`ttrpc.blocking.Client.call`. Server-streaming prints each response
as it arrives with ``compact=True`` (one JSON document per line);
client-streaming and bidi read their requests with
:func:`ttrpc.cli.codec.iter_json_lines`, one per line, from stdin (or from
``-d``'s text or file), sending each as soon as its line is read.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TextIO

from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from ttrpc.blocking import Client
from ttrpc.blocking import connect as blocking_connect
from ttrpc.cli.codec import (
    OutputOptions,
    UnrenderableError,
    format_message,
    iter_json_lines,
    parse_request,
    read_data,
)
from ttrpc.cli.descriptors import Descriptors, MethodRef
from ttrpc.cli.errors import (
    EXIT_USAGE,
    CliError,
    Reported,
    exit_code_for_status,
    one_line,
    status_name,
)
from ttrpc.context import Context
from ttrpc.metadata import Metadata
from ttrpc.status import Code, RpcError

__all__ = ["CallRequest", "connect", "report_status", "run_call"]

# Bounds connect() when no --timeout is given (a unix connect only blocks on a full backlog).
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class CallRequest:
    """Everything ``ttrpc call`` was asked to do."""

    address: str
    method: str
    data: str | None
    metadata: Metadata
    timeout: float | None
    output: OutputOptions


def run_call(
    request: CallRequest,
    descriptors: Descriptors,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Make the call and print its response; returns 0 (failures raise)."""
    ref = descriptors.find_method(request.method)
    runner = _RUNNERS[ref.kind]
    return runner(request, ref, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)


def _unary(
    request: CallRequest, ref: MethodRef, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    pool = ref.source.pool
    message = parse_request(read_data(request.data, stdin), ref.request_class(), pool)
    ctx = Context(timeout=request.timeout, metadata=request.metadata)
    with connect(request.address, request.timeout) as client:
        try:
            response = client.call(ref.service, ref.name, message, ref.response_class(), ctx)
        except RpcError as exc:
            if not exc.details:
                raise
            report_status(exc, ref.source.pool, stderr)
            raise Reported(exit_code_for_status(exc.code)) from None
    _print(response, ref, request.output, stdout, stderr)
    return 0


def report_status(error: RpcError, pool: descriptor_pool.DescriptorPool, stderr: TextIO) -> None:
    """The status line, then one line per detail (as JSON when its type is known)."""
    print(f"ttrpc: {status_name(error.code)}: {one_line(error.message)}", file=stderr)
    for detail in error.details:
        try:
            text = format_message(detail, pool, OutputOptions(compact=True))
        except UnrenderableError:
            text = f"{detail.type_url} ({len(detail.value)} bytes)"
        print(f"ttrpc: detail: {text}", file=stderr)


def _server_streaming(
    request: CallRequest, ref: MethodRef, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    pool = ref.source.pool
    message = parse_request(read_data(request.data, stdin), ref.request_class(), pool)
    ctx = Context(timeout=request.timeout, metadata=request.metadata)
    output = _stream_output(request.output)
    with connect(request.address, request.timeout) as client:
        stream = client.server_stream(ref.service, ref.name, message, ref.response_class(), ctx)
        with _reported(ref, stderr):
            for response in stream:
                _print(response, ref, output, stdout, stderr)
    return 0


def _client_streaming(
    request: CallRequest, ref: MethodRef, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    ctx = Context(timeout=request.timeout, metadata=request.metadata)
    with connect(request.address, request.timeout) as client:
        requests = _request_lines(request, ref, stdin)
        with _reported(ref, stderr):
            response = client.client_stream(
                ref.service, ref.name, requests, ref.response_class(), ctx
            )
    _print(response, ref, request.output, stdout, stderr)
    return 0


def _bidi_streaming(
    request: CallRequest, ref: MethodRef, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    ctx = Context(timeout=request.timeout, metadata=request.metadata)
    output = _stream_output(request.output)
    failures: list[BaseException] = []
    with connect(request.address, request.timeout) as client:
        stream = client.bidi_stream(ref.service, ref.name, None, ref.response_class(), ctx)

        def send_lines() -> None:
            # Each line goes out as soon as it is read: the server may answer before the next.
            try:
                for message in _request_lines(request, ref, stdin):
                    if stream.finished:
                        return
                    stream.send(message)
                stream.close_send()
            except RpcError:
                pass  # the call ended: its outcome is reported by the reading side
            except BaseException as exc:
                failures.append(exc)
                stream.cancel()

        sender = threading.Thread(target=send_lines, name="ttrpc-cli-send", daemon=True)
        sender.start()
        try:
            with _reported(ref, stderr):
                for response in stream:
                    _print(response, ref, output, stdout, stderr)
        except RpcError:
            sender.join(1)
            if failures:
                raise failures[0] from None
            raise
        sender.join(1)
        if failures:
            raise failures[0]
    return 0


def _request_lines(request: CallRequest, ref: MethodRef, stdin: TextIO) -> Iterator[Message]:
    """The requests of a client stream: JSON lines from stdin, or from ``-d``'s text/file."""
    data = request.data
    lines = stdin if data is None or data in ("-", "@-") else read_data(data, stdin).splitlines()
    return iter_json_lines(lines, ref.request_class(), ref.source.pool)


def _stream_output(output: OutputOptions) -> OutputOptions:
    """One JSON document per line for streamed responses."""
    return replace(output, compact=True) if output.format == "json" else output


class _reported:
    """Status details of a failed stream go to stderr, as for unary calls."""

    def __init__(self, ref: MethodRef, stderr: TextIO) -> None:
        self._ref = ref
        self._stderr = stderr

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, RpcError) and exc.details:
            report_status(exc, self._ref.source.pool, self._stderr)
            raise Reported(exit_code_for_status(exc.code)) from None


_Runner = Callable[[CallRequest, MethodRef, TextIO, TextIO, TextIO], int]
_RUNNERS: dict[str, _Runner] = {
    "unary": _unary,
    "server-streaming": _server_streaming,
    "client-streaming": _client_streaming,
    "bidi-streaming": _bidi_streaming,
}


def _print(
    message: Message, ref: MethodRef, output: OutputOptions, stdout: TextIO, stderr: TextIO
) -> None:
    try:
        text = format_message(message, ref.source.pool, output)
    except UnrenderableError as exc:
        print(f"ttrpc: warning: no JSON for this response ({exc}); text format:", file=stderr)
        text = format_message(message, ref.source.pool, OutputOptions(format="text"))
    if text:
        stdout.write(text + "\n")
    stdout.flush()


def connect(address: str, timeout: float | None) -> Client:
    """A blocking client for ``address``; an unreachable socket raises UNAVAILABLE."""
    try:
        return blocking_connect(
            address, timeout=DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout
        )
    except ValueError as exc:
        raise CliError(f"invalid address {address!r}: {exc}", EXIT_USAGE) from None
    except TimeoutError:
        raise RpcError(Code.UNAVAILABLE, f"cannot connect to {address}: timed out") from None
    except OSError as exc:
        raise RpcError(
            Code.UNAVAILABLE, f"cannot connect to {address}: {exc.strerror or exc}"
        ) from None
