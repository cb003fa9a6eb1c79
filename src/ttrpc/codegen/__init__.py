"""``protoc-gen-ttrpc``: generates typed ttrpc clients and service bases from ``.proto`` files.

Run it through protoc (``python -m ttrpc.protoc --ttrpc_out=DIR ...``); the
generation itself is :func:`ttrpc.codegen.generator.generate`.
"""

from ttrpc.codegen.generator import GeneratorError, generate, generate_module, output_path

__all__ = ["GeneratorError", "generate", "generate_module", "output_path"]
