"""containerd.runc.v1: options of the runtime v2 runc shims."""
