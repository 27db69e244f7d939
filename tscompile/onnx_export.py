"""The old home of the ONNX exporter, kept so `from tscompile.onnx_export import ...` works.
The exporter is the package `tscompile.onnx`; import from there."""
from tscompile.onnx import (COLLECTIVES, DOMAIN, FALLBACK_DOMAIN, OPSET, OnnxExport,  # noqa: F401
                            export_onnx, to_onnx)

__all__ = ["OnnxExport", "export_onnx", "to_onnx"]
