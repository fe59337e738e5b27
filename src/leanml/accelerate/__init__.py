"""Acceleration: operator fusion in torch and runtime back ends (ONNX Runtime static int8)."""
