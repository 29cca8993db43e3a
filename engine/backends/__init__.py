"""Backends that run the stages: torch (reference, custom kernels), ONNX Runtime (CPU default), TensorRT."""
