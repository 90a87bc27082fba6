"""ONNX export and the ONNX Runtime backend (see the ONNX issue; not built yet)."""
