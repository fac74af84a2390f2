"""Training methods (DomainBed-style): one class per method, one ``loss(batch)`` each, a registry."""

from egat.methods.base import LossOutput, Method, MethodConfig, method_registry
from egat.methods import erm as _erm, egat as _egat  # noqa: F401  (register the methods)
from egat.methods import (  # noqa: F401  (register the baselines, docs/method.md, Baselines)
    dmada as _dmada, dre as _dre, ign as _ign, igr as _igr, irm as _irm, pgd_at as _pgd_at,
    sgdrop as _sgdrop, sgt as _sgt,
)

__all__ = ["LossOutput", "Method", "MethodConfig", "method_registry"]
