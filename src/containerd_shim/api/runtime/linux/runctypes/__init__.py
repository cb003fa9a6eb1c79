"""containerd.linux.runc: options of the runtime v1 runc shim."""
