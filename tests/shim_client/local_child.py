"""The lifecycle test with ``client.local()``, in a process of its own (see test_lifecycle)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from containerd_shim import client

from .helpers import assert_no_leaks, bundle_dir, force_cleanup, lifecycle, new_id


def main() -> int:
    rootfs, namespace = Path(sys.argv[1]), sys.argv[2]
    events: list[str] = []
    cid = new_id("local")
    with bundle_dir(rootfs, cid) as b:
        b.write_spec(["/bin/true"])
        config = client.ShimConfig(path=b.bundle, namespace=namespace)
        shim = client.local(config, publish=lambda topic, event: events.append(topic))
        try:
            assert shim.shim_pid() == os.getpid()
            assert shim.is_alive()
            shim.stop_shim()  # never signals our own pid
            shim.kill_shim()
            lifecycle(shim, b, cid)
            # v1 shims publish exits only (containerd publishes the rest).
            assert events == ["/tasks/exit"] * 3, events
            shim.shutdown()
            assert_no_leaks(b, namespace, cid, -1, "")
        finally:
            shim.close()
            force_cleanup(b, namespace, cid)
    print("local lifecycle ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
