"""containerd.runtime.linux.shim.v1: the runtime v1 Shim service and its messages."""
