"""kvmesh: what every service shares: the ONNX model engine, tokenizer and chat template, CLI."""
