"""Explanation maps with one uniform call: ``explainer.attribute(inputs, target=...)``."""

from egat.explain.base import Explainer, explainer_registry, build_explainer, normalise_maps
from egat.explain import gradcam as _gradcam  # noqa: F401  (registers gradcam)

__all__ = ["Explainer", "explainer_registry", "build_explainer", "normalise_maps"]
