"""The runtime that generated optimizers build on."""

from optgen.runtime.base import GeneratedOptimizer

__all__ = ["GeneratedOptimizer"]
