"""The client-facing gRPC server: tokenization, routing, backend health, relaying streams."""
