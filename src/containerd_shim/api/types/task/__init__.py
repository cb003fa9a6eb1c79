"""containerd.v1.types: process status and descriptions."""
