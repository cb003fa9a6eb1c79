"""Runtime (shim) APIs of containerd."""
