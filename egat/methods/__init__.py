"""Training methods (DomainBed-style): one class per method, one ``loss(batch)`` each, a registry."""

from egat.methods.base import LossOutput, Method, build_method, method_registry
from egat.methods import erm as _erm, egat as _egat  # noqa: F401  (register the methods)

__all__ = ["LossOutput", "Method", "build_method", "method_registry"]
