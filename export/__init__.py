"""Export: streamed ONNX export, weight quantization, engine folders."""
