"""The KV layout and its codec to and from the wire."""
