"""containerd API messages and services, generated from our own .proto files in proto/."""
