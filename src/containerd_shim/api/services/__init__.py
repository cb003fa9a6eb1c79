"""containerd services a shim calls back."""
