"""The ``ttrpc`` command: argument parsing, dispatch, and turning failures into exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import ttrpc
from ttrpc.cli.call import CallRequest, run_call
from ttrpc.cli.codec import OutputOptions
from ttrpc.cli.completion import completion_script
from ttrpc.cli.describe import describe
from ttrpc.cli.descriptors import Descriptors
from ttrpc.cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    CliError,
    Reported,
    exit_code_for_status,
    one_line,
    status_name,
)
from ttrpc.cli.options import parse_duration, parse_metadata
from ttrpc.cli.shims import run_shims, state_dir
from ttrpc.status import RpcError

__all__ = ["build_parser", "main"]

PROG = "ttrpc"

_DESCRIPTION = """\
A command-line client for ttrpc, the RPC protocol of containerd and its shims.
containerd's task v2/v3, shim v1 and events services are built in; describe
others with --proto FILE -I DIR or --descriptor-set FILE."""

_EXIT_CODES = """\
exit codes:
  0       OK
  1-16    the call failed with this gRPC status code (4 DEADLINE_EXCEEDED,
          5 NOT_FOUND, 12 UNIMPLEMENTED, 14 UNAVAILABLE: also an unreachable socket)
  64      usage error (bad flag, unknown service or method)
  65      bad data (request JSON, .proto, descriptor set)
  66      an input file cannot be read
  69      protoc missing for --proto
  70      internal error (TTRPC_DEBUG=1 prints the traceback)"""

_MAIN_EXAMPLES = (
    """\
examples:
  ttrpc call unix:///run/containerd/s/HASH containerd.task.v2.Task/State -d '{"id": "web"}'
  ttrpc shims
  ttrpc list
  ttrpc describe containerd.task.v2.Task/State
  ttrpc call --proto api.proto -I protos unix:///run/my.sock my.v1.Svc/Get -d @req.json
  source <(ttrpc completion bash)

"""
    + _EXIT_CODES
)

_CALL_EXAMPLES = (
    """\
The request is JSON in protobuf's JSON mapping (field names as in the .proto or
in lowerCamelCase); with no -d, the empty message. The response is printed as
JSON (--format json, the default) or protobuf text format (--format text).

examples:
  # the state of a task, from its shim (address: the bundle's "address" file)
  ttrpc call unix:///run/containerd/s/HASH containerd.task.v2.Task/State \\
      -d '{"id": "web"}' -n default
  # the same service under containerd 2.x's name
  ttrpc call ADDRESS containerd.task.v3.Task/Pids -d '{"id": "web"}'
  # a containerd 1.x v1 shim
  ttrpc call ADDRESS containerd.runtime.linux.shim.v1.Shim/ShimInfo
  # any service, described by its .proto; request from a file, metadata, a deadline
  ttrpc call --proto kv.proto -I protos unix:///run/kv.sock kv.v1.Store/Get \\
      -d @get.json -m x-request-id=42 --timeout 2s
  echo '{"key": "a"}' | ttrpc call --descriptor-set kv.pb unix:///run/kv.sock kv.v1.Store/Get -d -

"""
    + _EXIT_CODES
)

_LIST_EXAMPLES = """\
examples:
  ttrpc list                                   # the built-in containerd services
  ttrpc list containerd.task.v2.Task           # its methods, as SERVICE/METHOD
  ttrpc list --proto kv.proto -I protos --no-builtin"""

_DESCRIBE_EXAMPLES = """\
examples:
  ttrpc describe containerd.task.v2.Task              # its methods
  ttrpc describe containerd.task.v2.Task/State        # request and response shapes
  ttrpc describe containerd.v1.types.Status           # a message or enum
  ttrpc describe                                      # every service"""

_SHIMS_EXAMPLES = """\
Finds the task bundles of runtime v2 (io.containerd.runtime.v2.task) and v1
(io.containerd.runtime.v1.linux) under containerd's state directory, and asks
each shim for its pid and its task's state. Shims that do not answer are listed
as UNREACHABLE and reported on stderr; the exit code is still 0.

examples:
  ttrpc shims                                  # state dir from /etc/containerd/config.toml
  ttrpc shims --state /run/containerd -n k8s.io --format json
  ttrpc shims --containerd-config /tmp/cd/config.toml"""

_COMPLETION_EXAMPLES = """\
examples:
  source <(ttrpc completion bash)              # in ~/.bashrc
  ttrpc completion zsh > "${fpath[1]}/_ttrpc"  # or: source <(ttrpc completion zsh)"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), not argparse's 2, which is gRPC's UNKNOWN."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also the source of the completion scripts)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, description=_DESCRIPTION, epilog=_MAIN_EXAMPLES, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {ttrpc.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    sources = _Parser(add_help=False)
    group = sources.add_argument_group("service descriptions")
    group.add_argument(
        "--proto",
        action="append",
        default=[],
        metavar="FILE",
        help="a .proto file describing services (repeatable; compiled with grpcio-tools' protoc)",
    )
    group.add_argument(
        "-I",
        "--import-path",
        action="append",
        default=[],
        metavar="DIR",
        dest="include",
        help="where --proto files and their imports are found (repeatable; "
        "default: each file's directory)",
    )
    group.add_argument(
        "--descriptor-set",
        action="append",
        default=[],
        metavar="FILE",
        help="a compiled FileDescriptorSet (protoc -o FILE --include_imports) (repeatable)",
    )
    group.add_argument(
        "--no-builtin",
        action="store_true",
        help="leave out the built-in containerd services",
    )

    call = commands.add_parser(
        "call",
        parents=[sources],
        help="call a method and print the response",
        description="Call METHOD on the ttrpc server at ADDRESS and print the response.",
        epilog=_CALL_EXAMPLES,
        formatter_class=formatter,
    )
    call.add_argument(
        "address", metavar="ADDRESS", help="unix:///path, unix://@abstract or a socket path"
    )
    call.add_argument("method", metavar="SERVICE/METHOD", help="e.g. containerd.task.v2.Task/State")
    call.add_argument(
        "-d",
        "--data",
        metavar="JSON",
        help="the request: JSON, @FILE, or - for stdin (default: the empty message)",
    )
    call.add_argument(
        "-m",
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata (repeatable)",
    )
    call.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help="containerd namespace: sets metadata containerd-namespace-ttrpc=NS",
    )
    call.add_argument(
        "-t",
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="deadline for the call, sent to the server: 500ms, 5s, 1m (default: none)",
    )
    call.add_argument(
        "-f", "--format", choices=("json", "text"), default="json", help="response format"
    )
    call.add_argument(
        "--omit-defaults",
        action="store_true",
        help="JSON: leave out fields that hold their default value",
    )
    call.add_argument(
        "--proto-names",
        action="store_true",
        help="JSON: field names as in the .proto (exec_id), not lowerCamelCase (execId)",
    )
    call.add_argument("--compact", action="store_true", help="JSON: on one line")

    listing = commands.add_parser(
        "list",
        parents=[sources],
        help="list services, or the methods of one",
        description="List the services that can be called, or the methods of SERVICE.",
        epilog=_LIST_EXAMPLES,
        formatter_class=formatter,
    )
    listing.add_argument("service", nargs="?", metavar="SERVICE")

    describe = commands.add_parser(
        "describe",
        parents=[sources],
        help="show a service, method, message or enum as .proto source",
        description="Show SERVICE, SERVICE/METHOD (with its message shapes), a message or an "
        "enum as .proto source.",
        epilog=_DESCRIBE_EXAMPLES,
        formatter_class=formatter,
    )
    describe.add_argument("symbol", nargs="?", metavar="SERVICE[/METHOD]|TYPE")

    shims = commands.add_parser(
        "shims",
        help="list the shims of a running containerd and their tasks' state",
        description="List the shims of a running containerd, for runtime v2 and v1.",
        epilog=_SHIMS_EXAMPLES,
        formatter_class=formatter,
    )
    shims.add_argument(
        "--state",
        metavar="DIR",
        help="containerd's state directory (default: from the config, else /run/containerd)",
    )
    shims.add_argument(
        "--containerd-config",
        metavar="FILE",
        help="read the state directory from this config.toml "
        "(default: /etc/containerd/config.toml if it exists)",
    )
    shims.add_argument("-n", "--namespace", metavar="NS", help="only this namespace")
    shims.add_argument(
        "-t",
        "--timeout",
        type=_duration,
        default=2.0,
        metavar="DURATION",
        help="deadline for each shim's answers (default: 2s)",
    )
    shims.add_argument(
        "-f", "--format", choices=("table", "json"), default="table", help="output format"
    )

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash or zsh.",
        epilog=_COMPLETION_EXAMPLES,
        formatter_class=formatter,
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _dispatch(args, parser)
    except RpcError as exc:
        print(f"ttrpc: {status_name(exc.code)}: {one_line(exc.message)}", file=sys.stderr)
        return exit_code_for_status(exc.code)
    except CliError as exc:
        print(f"ttrpc: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except Reported as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("ttrpc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output went away (| head): nothing left to say, and say it quietly.
        _silence_stdout()
        return 0
    except Exception as exc:
        if os.environ.get("TTRPC_DEBUG"):
            traceback.print_exc()
        print(
            f"ttrpc: internal error: {type(exc).__name__}: {one_line(str(exc))} "
            "(TTRPC_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_SOFTWARE


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command: str = args.command
    if command == "completion":
        sys.stdout.write(completion_script(args.shell, parser))
        return 0
    if command == "shims":
        return run_shims(
            state_dir(args.state, args.containerd_config),
            namespace=args.namespace,
            timeout=args.timeout,
            output=args.format,
        )
    descriptors = Descriptors(
        args.proto, args.include, args.descriptor_set, builtin=not args.no_builtin
    )
    if command == "call":
        return _call(args, descriptors)
    if command == "list":
        return _list(args, descriptors)
    if command == "describe":
        return _describe(args, descriptors)
    raise CliError(f"unknown command {command!r}", EXIT_USAGE)  # argparse already refuses


def _call(args: argparse.Namespace, descriptors: Descriptors) -> int:
    try:
        metadata = parse_metadata(args.metadata, args.namespace)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    request = CallRequest(
        address=args.address,
        method=args.method,
        data=args.data,
        metadata=metadata,
        timeout=args.timeout,
        output=OutputOptions(
            format=args.format,
            emit_defaults=not args.omit_defaults,
            proto_names=args.proto_names,
            compact=args.compact,
        ),
    )
    return run_call(request, descriptors)


def _list(args: argparse.Namespace, descriptors: Descriptors) -> int:
    if args.service:
        service, _ = descriptors.find_service(args.service)
        lines = [f"{service.full_name}/{method.name}" for method in service.methods]
    else:
        lines = descriptors.service_names()
    for line in lines:
        print(line)
    sys.stdout.flush()
    return 0


def _describe(args: argparse.Namespace, descriptors: Descriptors) -> int:
    if args.symbol:
        symbol, source = descriptors.find_symbol(args.symbol)
        print(describe(symbol, source))
    else:
        blocks = []
        for name in descriptors.service_names():
            service, source = descriptors.find_service(name)
            blocks.append(describe(service, source))
        print("\n\n".join(blocks))
    sys.stdout.flush()
    return 0
