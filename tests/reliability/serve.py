"""A test server in its own process, so that tests can watch its memory and descriptors.

::

    python tests/reliability/serve.py KIND ADDRESS [--options JSON] [--nofile N]

KIND is ``aio`` or ``blocking``; the server serves the test services of
``tests/unit/harness.py`` with the server options given as a JSON object, prints
``READY`` once it listens and stops on SIGTERM. ``--nofile`` lowers its
descriptor limit (RLIMIT_NOFILE) first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "src"), os.path.join(HERE, "..", "..")]

from tests.unit.harness import running_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["aio", "blocking"])
    parser.add_argument("address")
    parser.add_argument("--options", default="{}", help="server keyword arguments, as JSON")
    parser.add_argument("--nofile", type=int, help="RLIMIT_NOFILE soft limit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.nofile is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_server(args.kind, args.address, **json.loads(args.options)):
        print("READY", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
