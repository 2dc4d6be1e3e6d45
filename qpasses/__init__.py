"""qpass: a quantization compiler for ONNX graphs.

A float ONNX model goes in; a Q/DQ model that follows a deployment target's rules comes out.
"""

__version__ = "0.1.0"
