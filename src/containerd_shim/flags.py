"""Command-line flags as containerd passes them (Go's flag syntax: ``-name value``)."""

from __future__ import annotations

__all__ = ["Flags", "parse"]

_BOOLS = {"debug", "v", "version", "systemd-cgroup"}


class Flags:
    """The parsed command line. A plain class: ``dataclasses`` would cost every
    ``start`` ~15 ms of imports (inspect, ast, re)."""

    __slots__ = (
        "action",
        "address",
        "bundle",
        "containerd_binary",
        "criu_path",
        "debug",
        "extra",
        "id",
        "namespace",
        "publish_binary",
        "runtime_root",
        "socket",
        "systemd_cgroup",
        "version",
        "workdir",
    )  # fmt: skip

    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.version = False
        # v1 shim flags
        self.workdir = ""
        self.containerd_binary = ""
        self.criu_path = ""
        self.runtime_root = ""
        self.systemd_cgroup = False
        self.action = ""
        self.extra: list[str] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Flags({fields})"


def parse(argv: list[str]) -> Flags:
    """Parse ``-flag value``, ``--flag value``, ``-flag=value`` and boolean ``-flag``.

    Flags end at the first argument that is not one (the action: start, delete),
    as with Go's flag package.
    """
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            break
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        attr = name.replace("-", "_")
        if attr in ("v",):
            attr = "version"
        elif attr == "criu":  # Go's v1 shim calls it -criu; containerd 1.6 passes -criu-path
            attr = "criu_path"
        if not hasattr(flags, attr) or attr in ("action", "extra"):
            raise SystemExit(f"flag provided but not defined: -{name}")
        if name in _BOOLS or attr in ("version",):
            setattr(flags, attr, value is None or value.lower() in ("1", "t", "true"))
        else:
            if value is None:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, attr, value)
        i += 1
    rest = argv[i:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if rest:
        flags.action = rest[0]
        flags.extra = rest[1:]
    return flags
