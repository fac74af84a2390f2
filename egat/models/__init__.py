"""Image classifiers with a GAP -> dropout -> linear head and normalisation inside the model.

Every model is a :class:`Classifier`: ``features(x)`` gives the last conv block's map A (B, C, h, w)
from pixel-scale input x in [0, 1]; ``head(A)`` gives logits. Grad-CAM has a closed form on this head.
"""

from egat.models import zoo as _zoo  # noqa: F401  (registers the architectures)
from egat.models.classifier import Classifier, build_model, model_registry
from egat.models.mode import ModelMode, model_mode

__all__ = ["Classifier", "ModelMode", "build_model", "model_mode", "model_registry"]
