"""Explanation maps with one uniform call: ``explainer.attribute(inputs, target=...)``.

Explainers take plain keyword arguments (e.g. ``SmoothGrad(model, samples=8, stdev=0.15)``);
egat/build.py builds them from the params' ``explainer`` group."""

from egat.explain.base import (
    Explainer,
    InputGradientExplainer,
    explainer_registry,
    normalise_maps,
)
from egat.explain import finercam as _finercam  # noqa: F401  (each import registers one explainer)
from egat.explain import gradcam as _gradcam  # noqa: F401
from egat.explain import ig as _ig  # noqa: F401
from egat.explain import smoothgrad as _smoothgrad  # noqa: F401

__all__ = ["Explainer", "InputGradientExplainer", "explainer_registry", "normalise_maps"]
