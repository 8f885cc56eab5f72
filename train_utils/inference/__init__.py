"""Using a trained detector: rebuilding it from a weights file, ONNX export and runtime."""
