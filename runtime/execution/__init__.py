"""Executing ONNX with onnxruntime: sessions, batched inference, streamed activation profiling."""
