"""The model engine: GGUF import, ONNX graph building, the model folder, and the ONNX Runtime runner."""
