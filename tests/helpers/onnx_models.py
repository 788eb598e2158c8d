"""Real ONNX models for tests: see :mod:`server.onnx_models`."""

from server.onnx_models import make_model, reference_output

__all__ = ["make_model", "reference_output"]
