"""The composition root: params in, components out (docs/architecture.md).

Attacks, explainers and methods take plain keyword arguments and know nothing of the params
schema; this module is the one place that maps each params group onto them, and that checks every
name the params use against the registries. Entry points load params through :func:`load_params`
(or :func:`params_from_dict`), so a bad name fails there, in one line, before anything runs.

Example::

    params = load_params("params.yaml", ["train.method=pgd_at"])
    method = build_method(model, params)                 # PGDAT(model, attack=PGD(...))
    sweep = [build_attack(model, params.eval.attack, eps) for eps in (0.01, 0.02)]
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from egat.attacks import Attack, attack_registry
from egat.config import (
    AttackParams, ExplainerParams, Params, all_variants, format_validation_error, parse_params,
    read_params,
)
from egat.errors import ParamsError
from egat.explain import Explainer, explainer_registry
from egat.methods import Method, MethodConfig, method_registry
from egat.models import Classifier, model_registry


# --- attacks -------------------------------------------------------------------------------------

def attack_arguments(params: AttackParams, eps: float) -> dict[str, Any]:
    """The keyword arguments (besides model and eps) of attack ``params.name``: its params keys."""
    p = params
    match p.name:
        case "fgsm":
            return dict(model_mode=p.model_mode)
        case "mifgsm":
            # The step follows the paper (alpha = eps / steps, docs/method.md, Metrics), not
            # p.alpha, which is PGD's step and would not scale with eps in a sweep.
            return dict(steps=p.steps, decay=p.decay, model_mode=p.model_mode)
        case "pgd":
            return dict(alpha=p.alpha, steps=p.steps, random_start=p.random_start,
                        model_mode=p.model_mode)
        case "fgsm_rs":
            return dict(alpha=p.rs_alpha_ratio * eps, model_mode=p.model_mode)
        case "free":
            return dict(replays=p.replays)
        case "apgd":
            return dict(steps=p.steps, restarts=p.restarts, model_mode=p.model_mode)
        case "apgdt":
            return dict(steps=p.steps, restarts=p.restarts, targets=p.targets,
                        model_mode=p.model_mode)
        case "square":
            return dict(queries=p.queries, restarts=p.restarts, p_init=p.p_init,
                        model_mode=p.model_mode)
    raise ValueError(f"attack {p.name!r} has no params mapping in egat/build.py")


def build_attack(model: Classifier, params: AttackParams, eps: float | None = None) -> Attack:
    """The attack ``params.name`` built from ``params``; ``eps`` overrides ``params.eps`` (sweeps).
    ``autoattack`` is the ensemble of ``params.ensemble``, every member with these params and eps.

    Example::

        attack = build_attack(model, params.eval.attack)            # PGD-10, eps 8/255
        sweep = [build_attack(model, params.eval.attack, e) for e in (0.01, 0.02)]
    """
    eps = params.eps if eps is None else eps
    cls = attack_registry.get(params.name)
    if params.name == "autoattack":
        members = [build_attack(model, params.model_copy(update={"name": name}), eps)
                   for name in params.ensemble]
        return cls(model, members, model_mode=params.model_mode)
    return cls(model, eps, **attack_arguments(params, eps))


# --- explainers ----------------------------------------------------------------------------------

def build_explainer(
    name: str, model: Classifier, options: ExplainerParams | None = None
) -> Explainer:
    """The registered explainer ``name``, with its options from the params' ``explainer`` group
    (the sub-group named like it, e.g. ``explainer.smoothgrad``; None: the explainer's defaults)."""
    cls = explainer_registry.get(name)
    group = getattr(options, name, None)
    return cls(model, **(group.model_dump() if group is not None else {}))


# --- methods -------------------------------------------------------------------------------------

def method_hparams(params: Params, name: str | None = None) -> MethodConfig:
    """The validated hyperparameters of method ``name`` (default ``train.method``): its Config's
    defaults (and preset) with the params' ``methods.<name>`` over them."""
    name = name or params.train.method
    return method_registry.get(name).Config(**(params.methods.get(name) or {}))


# What a method's constructor may ask for by name, besides its hyperparameters, and where the
# params keep it (built in this order).
METHOD_COMPONENTS: dict[str, Callable[[Classifier, Params], Any]] = {
    "explainer": lambda model, p: build_explainer(p.explainer.name, model, p.explainer),
    "attack": lambda model, p: build_attack(model, p.attack),
    # the guide maps' noise: the noisy guide variant's sigma, none for the others
    "guide_sigma": lambda model, p: p.guides.sigma if p.guides.variant == "noisy" else 0.0,
    "guide_seed": lambda model, p: p.guides.seed,
    "eps": lambda model, p: p.attack.eps,
    "alpha": lambda model, p: p.attack.alpha,
    "attack_model_mode": lambda model, p: p.attack.model_mode,
}


def build_method(model: Classifier, params: Params, name: str | None = None) -> Method:
    """Method ``name`` (default ``train.method``) on ``model``: the components its constructor
    names (:data:`METHOD_COMPONENTS`) and its hyperparameters ``methods.<name>``.

    Example::

        method = build_method(model, params)       # EGAT(model, explainer=..., attack=..., ...)
    """
    name = name or params.train.method
    cls = method_registry.get(name)
    wanted = inspect.signature(cls).parameters
    components = {key: make(model, params) for key, make in METHOD_COMPONENTS.items()
                  if key in wanted}
    return cls(model, **components, **(params.methods.get(name) or {}))


# --- params: names checked against the registries ------------------------------------------------

def check_name(key: str, value: str, valid: list[str]) -> None:
    """ValueError ``<key>=<value> is unknown; valid: ...`` unless ``value`` is in ``valid``."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is unknown; valid: {', '.join(valid)}")


def _check_names_in(key: str, values: list[str], valid: list[str]) -> None:
    for value in values:
        check_name(key, value, valid)


def _check_evaluation_attack(key: str, attack: AttackParams) -> None:
    if attack_registry.get(attack.name).training_only:
        evaluation = [n for n in attack_registry.names()
                      if not attack_registry.get(n).training_only]
        raise ValueError(f"{key}: name={attack.name!r} is a training-time attack; evaluate with "
                         f"{', '.join(evaluation)}")


def check_names(params: Params) -> None:
    """ValueError naming the first key whose name is not registered (methods, models, explainers),
    whose ``methods.<name>`` hyperparameters its method's Config rejects, whose evaluation attack
    is a training-time one, or whose study/variant run does not exist."""
    methods = method_registry.names()
    _check_evaluation_attack("eval.attack", params.eval.attack)
    _check_evaluation_attack("robust.attack", params.robust.attack)
    check_name("model.name", params.model.name, model_registry.names())
    check_name("explainer.name", params.explainer.name, explainer_registry.names())
    check_name("eval.explainer", params.eval.explainer, explainer_registry.names())
    check_name("train.method", params.train.method, methods)
    _check_names_in("study.methods", params.study.methods, methods)
    for name, cfg in params.methods.items():
        check_name(f"methods.{name}", name, methods)
        try:
            method_registry.get(name).Config(**(cfg or {}))
        except ValidationError as exc:  # re-raised with the full key path
            raise ValueError(format_validation_error(exc, f"methods.{name}", "")) from None
    check_name("tune.method", params.tune.method, methods)
    check_name("robust.transfer_from", params.robust.transfer_from, methods)
    check_name("robust.transfer_fallback", params.robust.transfer_fallback, methods)
    for key in ("transfer_from", "transfer_fallback"):  # the runs robustness check (d) reads
        if getattr(params.robust, key) not in params.study.methods:
            raise ValueError(
                f"robust.{key}={getattr(params.robust, key)!r} is not in study.methods "
                f"({', '.join(params.study.methods)}), so its runs are never trained; set it "
                f"to one of them")
    _check_studies(params, methods)


def _check_studies(params: Params, methods: list[str]) -> None:
    """Every name the studies use is a variant (:func:`egat.config.all_variants`) or a registered
    method."""
    st = params.studies
    variants = all_variants(params)
    for name, variant in variants.items():
        check_name(f"studies.variants.{name}.method", variant.method, methods)
        if name in methods:
            raise ValueError(f"studies.variants.{name}: a variant may not be named like a method")
    runs = sorted(variants) + methods  # rows without runs are reported as not run
    _check_names_in("study.references", params.study.references, sorted(variants))
    _check_names_in("studies.train", st.train, sorted(variants))
    for key in ("sensitivity", "ablation", "case_study.runs"):
        group, _, sub = key.partition(".")
        _check_names_in(f"studies.{key}", getattr(getattr(st, group), sub) if sub
                        else getattr(st, group), runs)
    _check_names_in("studies.runtime", st.runtime, sorted(variants))


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """``raw`` validated: the schema's checks (egat/config.py), then :func:`check_names`; a failure
    is one :class:`ParamsError` line ``<source>: invalid params: <key>: <problem>``."""
    params = parse_params(raw, source)
    try:
        check_names(params)
    except ValueError as exc:
        raise ParamsError(f"{source}: invalid params: {exc}") from None
    return params


def load_params(
    path: str | Path | None = "params.yaml", overrides: list[str] | None = None
) -> Params:
    """Load, override and validate params (:func:`params_from_dict`). ``path=None`` uses the
    built-in defaults."""
    return params_from_dict(*read_params(path, overrides))
