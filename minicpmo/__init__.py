"""minicpmo-onnx: MiniCPM-o 2.6 as int4 ONNX graphs, run with ONNX Runtime.

This folder holds only the package root. Its parts stand at the top of the repository and install
under this name: export/ as minicpmo.export, runtime/ as minicpmo.runtime, cli/ as minicpmo.cli.
"""

__version__ = "0.1.0"
