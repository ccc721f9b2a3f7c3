"""rwkv-export: export RWKV language models to edge and browser runtimes.

Importing this package is cheap: torch, onnx and every runtime are imported inside the functions that need them.
"""

__version__ = "0.1.0"
