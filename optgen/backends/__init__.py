"""Backends: ``reference`` interprets the IR with plain torch ops; ``torch`` renders multi-tensor
Python code (:mod:`optgen.backends.torch_codegen`)."""

BACKENDS = ("auto", "torch", "reference")
