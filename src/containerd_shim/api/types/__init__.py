"""containerd.types: shared messages (Mount, Metric)."""
