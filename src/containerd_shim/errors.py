"""containerd's error kinds, as ttrpc statuses (what errdefs.ToGRPC produces)."""

from __future__ import annotations

from ttrpc import Code, RpcError

__all__ = [
    "already_exists",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "unimplemented",
]


def not_found(message: str) -> RpcError:
    return RpcError(Code.NOT_FOUND, message)


def already_exists(message: str) -> RpcError:
    return RpcError(Code.ALREADY_EXISTS, message)


def failed_precondition(message: str) -> RpcError:
    return RpcError(Code.FAILED_PRECONDITION, message)


def invalid_argument(message: str) -> RpcError:
    return RpcError(Code.INVALID_ARGUMENT, message)


def unimplemented(message: str) -> RpcError:
    return RpcError(Code.UNIMPLEMENTED, message)
