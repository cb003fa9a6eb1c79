"""Command-line flags as containerd passes them (Go's flag syntax: ``-name value``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Flags", "parse"]

_BOOLS = {"debug", "v", "version", "systemd-cgroup"}


@dataclass
class Flags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    # v1 shim flags
    workdir: str = ""
    containerd_binary: str = ""
    criu_path: str = ""
    runtime_root: str = ""
    systemd_cgroup: bool = False
    action: str = ""
    extra: list[str] = field(default_factory=list)


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
