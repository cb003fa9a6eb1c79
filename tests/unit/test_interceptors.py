"""Client and server interceptors (unary and stream), on both servers and both clients."""

from __future__ import annotations

import ast
import logging
import time
from typing import Any

import pytest

from ttrpc import Code, Context, RpcError
from ttrpc.interceptors import CallInfo, Interceptor, LoggingInterceptor
from ttrpc.ttrpc_pb2 import KeyValue

from .harness import SERVICE, STREAMS, SyncCaller, running_server
from .test_streams import both, down, up

KINDS = [("aio", "aio"), ("aio", "blocking"), ("blocking", "aio"), ("blocking", "blocking")]
IDS = [f"{s}-server-{c}-client" for s, c in KINDS]


class Recorder(Interceptor):
    """Records every hook it passes through, in and out, with the outcome."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def _out(self, info: CallInfo, error: BaseException | None) -> None:
        outcome = "ok" if error is None else getattr(error, "code", type(error).__name__)
        self.log.append(f"{self.name} out {info.full_method} {outcome}")

    async def client_unary(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        return await self._unary_async("client", request, ctx, info, call_next)

    async def server_unary(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        return await self._unary_async("server", request, ctx, info, call_next)

    async def _unary_async(
        self, side: str, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        self.log.append(f"{self.name} in {side} {info.kind}")
        try:
            reply = await call_next(request, ctx)
        except BaseException as exc:
            self._out(info, exc)
            raise
        self._out(info, None)
        return reply

    def blocking_client_unary(
        self, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        return self._unary("client", request, ctx, info, call_next)

    def blocking_server_unary(
        self, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        return self._unary("server", request, ctx, info, call_next)

    def _unary(self, side: str, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        self.log.append(f"{self.name} in {side} {info.kind}")
        try:
            reply = call_next(request, ctx)
        except BaseException as exc:
            self._out(info, exc)
            raise
        self._out(info, None)
        return reply

    def client_stream(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        self.log.append(f"{self.name} in client {info.kind}")
        stream = call_next(request, ctx)
        stream.add_done_callback(lambda error: self._out(info, error))
        return stream

    blocking_client_stream = client_stream

    async def server_stream(self, stream: Any, info: CallInfo, call_next: Any) -> Any:
        self.log.append(f"{self.name} in server {info.kind}")
        try:
            reply = await call_next(stream)
        except BaseException as exc:
            self._out(info, exc)
            raise
        self._out(info, None)
        return reply

    def blocking_server_stream(self, stream: Any, info: CallInfo, call_next: Any) -> Any:
        self.log.append(f"{self.name} in server {info.kind}")
        try:
            reply = call_next(stream)
        except BaseException as exc:
            self._out(info, exc)
            raise
        self._out(info, None)
        return reply


class Stamp(Interceptor):
    """Adds metadata and shortens the deadline of every outgoing call (all client hooks)."""

    def _stamp(self, ctx: Context) -> None:
        ctx.metadata.append("x-stamp", "1")
        ctx.set_timeout(3)

    async def client_unary(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        self._stamp(ctx)
        return await call_next(request, ctx)

    def blocking_client_unary(
        self, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        self._stamp(ctx)
        return call_next(request, ctx)

    def client_stream(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        self._stamp(ctx)
        return call_next(request, ctx)

    blocking_client_stream = client_stream


class Gate(Interceptor):
    """Server side: refuses calls without a token, and tells handlers who passed."""

    def _check(self, ctx: Context) -> None:
        if ctx.metadata.get_one("token") != "ok":
            raise RpcError(Code.PERMISSION_DENIED, "no token")
        ctx.metadata.set("checked-by", "gate")

    async def server_unary(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        self._check(ctx)
        return await call_next(request, ctx)

    def blocking_server_unary(
        self, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        self._check(ctx)
        return call_next(request, ctx)

    async def server_stream(self, stream: Any, info: CallInfo, call_next: Any) -> Any:
        self._check(stream.ctx)
        return await call_next(stream)

    def blocking_server_stream(self, stream: Any, info: CallInfo, call_next: Any) -> Any:
        self._check(stream.ctx)
        return call_next(stream)


@pytest.fixture(params=KINDS, ids=IDS)
def kinds(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


def _settle(log: list[str], n: int) -> None:
    # Server "out" records are written after the answer is sent.
    end = time.monotonic() + 5
    while len(log) < n and time.monotonic() < end:
        time.sleep(0.005)


def test_chain_order_and_outcome(kinds: tuple[str, str], address: str) -> None:
    server_kind, client_kind = kinds
    slog: list[str] = []
    clog: list[str] = []
    server_icpt = [Recorder("s1", slog), Recorder("s2", slog)]
    with running_server(server_kind, address, interceptors=server_icpt):
        client = SyncCaller(
            client_kind, address, interceptors=[Recorder("c1", clog), Recorder("c2", clog)]
        )
        try:
            assert client.call("Echo", KeyValue(key="a")).key == "a"
            _settle(slog, 4)
            echo = f"/{SERVICE}/Echo"
            assert clog == [
                "c1 in client unary",
                "c2 in client unary",
                f"c2 out {echo} ok",
                f"c1 out {echo} ok",
            ]
            assert slog == [
                "s1 in server unary",
                "s2 in server unary",
                f"s2 out {echo} ok",
                f"s1 out {echo} ok",
            ]
            clog.clear()
            slog.clear()
            with pytest.raises(RpcError):
                client.call("Fail", KeyValue(key="rpc", value="no"))
            _settle(slog, 4)
            fail = f"/{SERVICE}/Fail"
            assert clog[-1] == f"c1 out {fail} {Code.FAILED_PRECONDITION}"
            assert slog[-1] == f"s1 out {fail} {Code.FAILED_PRECONDITION}"
            # Streams: the same chains, with the kind and the outcome at the stream's end.
            for make, kind in [
                (lambda: down(client, 2), "server-streaming"),
                (lambda: both(client), "bidi-streaming"),
            ]:
                clog.clear()
                slog.clear()
                stream = make()
                if kind == "bidi-streaming":
                    stream.send(KeyValue(key="x"))
                    stream.close_send()
                stream.drain()
                _settle(slog, 4)
                method = "Down" if kind == "server-streaming" else "Both"
                assert clog == [
                    f"c1 in client {kind}",
                    f"c2 in client {kind}",
                    f"c2 out /{STREAMS}/{method} ok",
                    f"c1 out /{STREAMS}/{method} ok",
                ]
                assert slog[:2] == [f"s1 in server {kind}", f"s2 in server {kind}"]
                assert slog[-1] == f"s1 out /{STREAMS}/{method} ok"
            clog.clear()
            stream = up(client)
            stream.send(KeyValue(key="fail"))
            with pytest.raises(RpcError):
                stream.result()
            assert clog[-1] == f"c1 out /{STREAMS}/Up {Code.FAILED_PRECONDITION}"
        finally:
            client.close()


def test_client_interceptor_changes_metadata_and_deadline(
    kinds: tuple[str, str], address: str
) -> None:
    server_kind, client_kind = kinds
    with running_server(server_kind, address):
        client = SyncCaller(client_kind, address, interceptors=[Stamp()])
        try:
            ctx = Context(metadata={"k": "v"})
            pairs, remaining, _ = ast.literal_eval(client.call("Echo", KeyValue(), ctx).value)
            assert pairs == [("k", "v"), ("x-stamp", "1")]
            assert remaining is not None and 0 < remaining <= 3
            # The caller's context is untouched (interceptors get a copy).
            assert ctx.metadata.pairs() == [("k", "v")] and ctx.deadline is None
            (first,) = down(client, 1, "md", ctx).drain()
            pairs, remaining = ast.literal_eval(first.value)
            assert pairs == [("k", "v"), ("x-stamp", "1")] and 0 < remaining <= 3
        finally:
            client.close()


def test_server_interceptor_short_circuits_and_sets_metadata(
    kinds: tuple[str, str], address: str
) -> None:
    server_kind, client_kind = kinds
    with running_server(server_kind, address, interceptors=[Gate()]):
        client = SyncCaller(client_kind, address)
        try:
            with pytest.raises(RpcError) as err:
                client.call("Echo", KeyValue())
            assert (err.value.code, err.value.message) == (Code.PERMISSION_DENIED, "no token")
            ctx = Context(metadata={"token": "ok"})
            pairs, _, _ = ast.literal_eval(client.call("Echo", KeyValue(), ctx).value)
            assert ("checked-by", "gate") in pairs
            with pytest.raises(RpcError) as err:
                down(client, 3).drain()
            assert err.value.code == Code.PERMISSION_DENIED
            (first,) = down(client, 1, "md", ctx).drain()
            assert ("checked-by", "gate") in ast.literal_eval(first.value)[0]
        finally:
            client.close()


class Refuse(Interceptor):
    async def client_unary(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        raise RpcError(Code.UNAUTHENTICATED, f"not calling {info.full_method}")

    def blocking_client_unary(
        self, request: Any, ctx: Context, info: CallInfo, call_next: Any
    ) -> Any:
        raise RpcError(Code.UNAUTHENTICATED, f"not calling {info.full_method}")

    def client_stream(self, request: Any, ctx: Context, info: CallInfo, call_next: Any) -> Any:
        raise RpcError(Code.UNAUTHENTICATED, "no streams")

    blocking_client_stream = client_stream


@pytest.mark.parametrize("client_kind", ["aio", "blocking"])
def test_client_interceptor_short_circuits(client_kind: str, address: str) -> None:
    log: list[str] = []
    with running_server("blocking", address, interceptors=[Recorder("s", log)]):
        client = SyncCaller(client_kind, address, interceptors=[Refuse()])
        try:
            with pytest.raises(RpcError) as err:
                client.call("Echo", KeyValue())
            assert err.value.message == f"not calling /{SERVICE}/Echo"
            with pytest.raises(RpcError) as err:
                down(client, 1)
            assert err.value.code == Code.UNAUTHENTICATED
            assert log == []  # nothing went out
            assert client.client._conn.pending == 0
        finally:
            client.close()


def test_interceptors_must_be_interceptor_objects() -> None:
    import ttrpc.blocking

    with pytest.raises(TypeError, match="Interceptor"):
        ttrpc.blocking.Server(interceptors=[lambda *a: None])  # type: ignore[list-item]


# -- the shipped interceptors -----------------------------------------------------------


def test_logging_interceptor(
    kinds: tuple[str, str], address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ttrpc.calls")
    records = caplog.records
    server_kind, client_kind = kinds
    logger = LoggingInterceptor(metadata_keys=["x-request-id"])
    with running_server(server_kind, address, interceptors=[logger]):
        client = SyncCaller(client_kind, address, interceptors=[logger])
        try:
            client.call("Echo", KeyValue(), Context(metadata={"x-request-id": "r1"}))
            with pytest.raises(RpcError):
                client.call("Fail", KeyValue(key="notfound", value="gone"))
            down(client, 2).drain()
        finally:
            client.close()
    end = time.monotonic() + 5
    while len(records) < 6 and time.monotonic() < end:
        time.sleep(0.01)
    by = {(r.ttrpc_side, r.ttrpc_method, r.ttrpc_code) for r in records}  # type: ignore[attr-defined]
    for side in ("client", "server"):
        assert (side, f"/{SERVICE}/Echo", "OK") in by
        assert (side, f"/{SERVICE}/Fail", "NOT_FOUND") in by
        assert (side, f"/{STREAMS}/Down", "OK") in by
    echo = [r for r in records if r.ttrpc_method.endswith("/Echo")]  # type: ignore[attr-defined]
    assert all(r.ttrpc_md_x_request_id == "r1" for r in echo)  # type: ignore[attr-defined]
    server_echo = [r for r in echo if r.ttrpc_side == "server"]  # type: ignore[attr-defined]
    assert server_echo[0].ttrpc_peer_uid >= 0  # type: ignore[attr-defined]
    fail = [r for r in records if r.ttrpc_code == "NOT_FOUND"]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING for r in fail)
    assert all(r.ttrpc_duration_ms >= 0 for r in records)  # type: ignore[attr-defined]


def test_tracing_interceptor_propagates_traceparent(kinds: tuple[str, str], address: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from ttrpc.otel import TracingInterceptor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingInterceptor(tracer_provider=provider)
    server_kind, client_kind = kinds
    seen: list[str] = []

    class Peek(Interceptor):
        """Inside the server's tracing interceptor: what arrived on the wire."""

        def _peek(self, ctx: Context) -> None:
            seen.append(ctx.metadata.get_one("traceparent") or "")

        async def server_unary(self, request: Any, ctx: Context, info: CallInfo, nxt: Any) -> Any:
            self._peek(ctx)
            return await nxt(request, ctx)

        def blocking_server_unary(
            self, request: Any, ctx: Context, info: CallInfo, nxt: Any
        ) -> Any:
            self._peek(ctx)
            return nxt(request, ctx)

    with running_server(server_kind, address, interceptors=[tracing, Peek()]):
        client = SyncCaller(client_kind, address, interceptors=[tracing])
        try:
            client.call("Echo", KeyValue())
            with pytest.raises(RpcError):
                client.call("Fail", KeyValue(key="rpc", value="x"))
            down(client, 2).drain()
        finally:
            client.close()
    end = time.monotonic() + 5
    while len(exporter.get_finished_spans()) < 6 and time.monotonic() < end:
        time.sleep(0.01)
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    clients = {s.name: s for s in spans if s.kind == SpanKind.CLIENT}
    servers = {s.name: s for s in spans if s.kind == SpanKind.SERVER}
    assert (
        set(clients)
        == set(servers)
        == {
            f"{SERVICE}/Echo",
            f"{SERVICE}/Fail",
            f"{STREAMS}/Down",
        }
    )
    for name, server_span in servers.items():
        client_span = clients[name]
        # One trace: the server span is the client span's child, through traceparent.
        assert server_span.context.trace_id == client_span.context.trace_id
        assert server_span.parent is not None
        assert server_span.parent.span_id == client_span.context.span_id
        assert server_span.attributes["rpc.system"] == "ttrpc"
    assert clients[f"{SERVICE}/Fail"].status.status_code == StatusCode.ERROR
    assert clients[f"{SERVICE}/Fail"].attributes["rpc.ttrpc.status_code"] == 9
    assert servers[f"{SERVICE}/Echo"].status.status_code == StatusCode.UNSET
    trace_id = f"{clients[f'{SERVICE}/Echo'].context.trace_id:032x}"
    assert seen[0].startswith(f"00-{trace_id}-")
