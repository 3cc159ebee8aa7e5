"""The Decode service: pulls KV, continuous batching, sampling, streaming tokens."""
