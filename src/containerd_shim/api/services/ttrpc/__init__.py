"""containerd services served over ttrpc."""
