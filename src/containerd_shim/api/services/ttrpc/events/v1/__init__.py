"""containerd.services.events.ttrpc.v1: the Events service shims publish to."""
