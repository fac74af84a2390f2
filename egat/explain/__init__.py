"""Explanation maps with one uniform call: ``explainer.attribute(inputs, target=...)``."""

from egat.explain.base import (
    Explainer,
    InputGradientExplainer,
    build_explainer,
    explainer_registry,
    normalise_maps,
)
from egat.explain import finercam as _finercam  # noqa: F401  (each import registers one explainer)
from egat.explain import gradcam as _gradcam  # noqa: F401
from egat.explain import ig as _ig  # noqa: F401
from egat.explain import smoothgrad as _smoothgrad  # noqa: F401

__all__ = ["Explainer", "InputGradientExplainer", "explainer_registry", "build_explainer",
           "normalise_maps"]
