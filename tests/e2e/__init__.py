"""End-to-end tests: real containers through a private containerd, per shim runtime."""
