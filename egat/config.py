"""The params schema: every tunable number of the project, grouped by pipeline stage.

The field defaults are the study's values: ``Params()`` is the study params.yaml describes, and
params.yaml repeats them (tests/test_config.py fails naming any key where the two disagree); the
paper's values stay reachable by name (``methods.egat.preset: paper``, the comments in params.yaml).
params.yaml is validated against these models when any stage or command starts; a bad key or value
raises :class:`ParamsError` naming the key and what would be valid. ``--set a.b=v`` overrides are
applied before validation (values are parsed as YAML). The names of methods, models, explainers
and attacks are checked against their registries by egat/build.py (``load_params``), which every
entry point loads params through: the schema imports no component.
"""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from egat.errors import ParamsError


def _fraction(value: Any) -> Any:
    """Accept '8/255' as well as 0.0314 for epsilons and step sizes."""
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            return value
    return value


def _fractions(value: Any) -> Any:
    """:func:`_fraction` of each entry of a list."""
    return [_fraction(e) for e in value] if isinstance(value, list) else value


def _increasing_eps(value: list[float]) -> list[float]:
    if not value or not all(0 <= e <= 1 for e in value) \
            or any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"eps must be a non-empty increasing list of values in [0, 1], got {value}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EmbeddedParams(Strict):
    """The offline benchmark: animal-mnist silhouettes on scikit-image textures (docs/data.md)."""

    package: str = "animal-mnist==0.4"
    wheel_sha256: str = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
    domains: list[str] = ["grass", "gravel", "brick", "camera"]
    per_class: int = Field(250, ge=10, le=250, description="images per class and domain")
    image_size: int = Field(32, ge=32, le=64)
    object_size: int = Field(24, ge=8)
    jitter: int = Field(4, ge=0)
    # The spurious cue: a corner patch (removable by guidance), the whole background tinted (the
    # negative control: it reaches the object's features through the receptive field), or none.
    cue: Literal["patch", "tint", "none"] = "patch"
    # P(the cue shows the class's own colour in this domain); each domain also permutes the colours.
    cue_match: list[float] = [0.9, 0.8, 0.7, 0.6]
    patch_size: int = Field(5, ge=1)  # side in px of the corner patch (cue: patch)
    patch_strength: float = Field(0.6, gt=0, le=1)  # patch colour = strength * the cue colour
    tint_strength: float = Field(0.25, ge=0, le=1)  # cue: tint
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "tint_match" in data:
            raise ValueError("tint_match was renamed cue_match (it applies to every cue)")
        return data

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.cue_match) != len(self.domains):
            raise ValueError(
                f"cue_match has {len(self.cue_match)} entries but domains has {len(self.domains)}"
            )
        if any(not 0.0 <= p <= 1.0 for p in self.cue_match):
            raise ValueError(f"cue_match entries must lie in [0, 1], got {self.cue_match}")
        if self.object_size + 2 * self.jitter > self.image_size:
            raise ValueError("object_size + 2*jitter must fit in image_size")
        # A corner square clear of the object's box exists only when the object can sit far enough
        # from that corner: its margin (image_size - object_size) / 2 plus the jitter.
        room = (self.image_size - self.object_size) // 2 + self.jitter
        if self.cue == "patch" and self.patch_size > room:
            raise ValueError(
                f"patch_size={self.patch_size} cannot fit beside a {self.object_size} px object in "
                f"{self.image_size} px images (jitter {self.jitter}); use patch_size <= {room}"
            )
        return self


class SourceParams(Strict):
    """One downloadable file of a real dataset; an empty sha256 means "not verified" (with a warning)."""

    url: str
    sha256: str = ""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v):
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {v!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v):
        v = v.strip().lower()
        if v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"sha256 must be 64 hex digits (or empty: not verified), got {v!r}")
        return v


# The files DomainBed's domainbed/scripts/download.py fetches. DomainBed lists no checksums, so none are
# pinned here: the first download warns and prints the sha256 to put in params.yaml.
DEFAULT_SOURCES = {
    # DomainBed: https://drive.google.com/uc?id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8 (VLCS.tar.gz). The same
    # file through Drive's direct endpoint: `uc` answers large files with a virus-scan page, not the file.
    "vlcs": SourceParams(
        url="https://drive.usercontent.google.com/download?id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"
        "&export=download&confirm=t"
    ),
    # DomainBed used https://lilablobssc.blob.core.windows.net/caltechcameratraps/...; LILA has since moved
    # the same files to its Google Cloud mirror.
    "terra_incognita_images": SourceParams(
        url="https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/eccv_18_all_images_sm.tar.gz"
    ),
    "terra_incognita_annotations": SourceParams(
        url="https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/labels/"
        "caltech_camera_traps.json.zip"
    ),
}


FOLDER_PLACEHOLDER = "examples/folder_tree"  # data.folder_root's default, a folder without domains


class DataParams(Strict):
    name: Literal["embedded", "vlcs", "terra_incognita", "folder"] = "embedded"
    dir: str = "data"  # <dir>/<name>/ (prepared), <dir>/guides/<name>/, <dir>/raw/ (downloads)
    # for name=folder: a <root>/<domain>/<class>/* tree. prepare's DVC dependency, so the default
    # is a placeholder that exists in every checkout (examples/folder_tree/README.md).
    folder_root: str | None = FOLDER_PLACEHOLDER
    image_size: int = Field(32, ge=8, le=1024)
    split_seed: int = 0
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    augment: bool = False
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)
    embedded: EmbeddedParams = EmbeddedParams()
    sources: dict[str, SourceParams] = DEFAULT_SOURCES  # keys left out keep their default

    @field_validator("sources")
    @classmethod
    def _default_sources(cls, v):
        return {**DEFAULT_SOURCES, **v}

    @field_validator("split")
    @classmethod
    def _split_sums(cls, v):
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be positive and sum to 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _folder_root(self):
        if self.name == "folder" and self.folder_root in (None, "", FOLDER_PLACEHOLDER):
            raise ValueError("data.name=folder needs data.folder_root (a <root>/<domain>/<class>/* tree)")
        return self

    @property
    def root(self) -> Path:
        """The prepared dataset: images/, masks/ (where there are), splits.json."""
        return Path(self.dir) / self.name

    @property
    def guides_root(self) -> Path:
        """Guide maps, apart from the prepared data (each is its own DVC output)."""
        return Path(self.dir) / "guides" / self.name

    @property
    def splits_file(self) -> Path:
        return self.root / "splits.json"

    @property
    def raw_dir(self) -> Path:
        """Downloads (archives, wheels), kept between runs."""
        return Path(self.dir) / "raw"


class GuideParams(Strict):
    variant: Literal["grayscale", "noisy", "golden"] = "grayscale"
    sigma: float = Field(0.1, ge=0)  # noise std of the `noisy` variant (at feature resolution)
    sigmas: list[float] = [0.1, 0.3]  # levels the sensitivity study sweeps
    seed: int = 0


class ModelParams(Strict):
    name: str = "small_resnet"
    pretrained: str = "none"  # none | imagenet | path to a local state_dict
    dropout: float = Field(0.1, ge=0, lt=1)
    channels_last: bool = True  # NHWC activations (faster convolutions)
    # Resize inputs to this many px inside the model (bilinear); null = the data's size. For the
    # stride-32 ImageNet backbones on small images (at 32 px their map is 1x1, every CAM constant).
    input_size: int | None = Field(None, ge=8, le=1024)


class AttackParams(Strict):
    # fgsm_rs and free are training-time attacks (fast adversarial training), not evaluation ones.
    # apgd, apgdt, square, autoattack: AutoAttack's attacks (Croce & Hein 2020; README, Robust evaluation).
    name: Literal["fgsm", "mifgsm", "pgd", "fgsm_rs", "free", "apgd", "apgdt", "square",
                  "autoattack"] = "pgd"
    eps: float = Field(8 / 255, ge=0, le=1)
    alpha: float = Field(2 / 255, ge=0, le=1)
    steps: int = Field(10, ge=1)
    random_start: bool = True
    decay: float = Field(1.0, ge=0)  # MI-FGSM momentum mu
    model_mode: Literal["eval", "train"] = "eval"  # the model's mode while the attack runs
    rs_alpha_ratio: float = Field(1.25, gt=0)  # fgsm_rs: step = ratio * eps (Wong et al. 2020)
    replays: int = Field(4, ge=1)  # free: minibatch replays m (Shafahi et al. 2019)
    restarts: int = Field(1, ge=1)  # apgd, apgdt, square: random restarts (per image, the best)
    targets: int = Field(9, ge=1)  # apgdt: target classes (the top ones after the true class)
    queries: int = Field(5000, ge=1)  # square: queries per image and restart
    p_init: float = Field(0.8, gt=0, le=1)  # square: initial fraction of pixels per square
    # autoattack: its attacks, run in turn on the images the previous ones did not fool
    ensemble: list[Literal["fgsm", "mifgsm", "pgd", "apgd", "apgdt", "square"]] = Field(
        ["apgd", "apgdt", "square"], min_length=1)

    _frac = field_validator("eps", "alpha", mode="before")(lambda v: _fraction(v))


class TrainingAttackParams(AttackParams):
    """``attack``, the training-time attack of adversarial methods: the study's CPU preset PGD-2
    with Madry's step 2.5 eps / steps (the paper's PGD-10 is ``steps: 10, alpha: 2/255``, as
    ``eval.attack``; docs/results/v5_cpu_attack_check.md); keys given without these keep them."""

    alpha: float = Field(0.0392, ge=0, le=1)  # 2.5 * (8/255) / 2, rounded as the study runs it
    steps: int = Field(2, ge=1)


class SmoothGradParams(Strict):
    samples: int = Field(4, ge=1)  # noisy copies per image
    stdev: float = Field(0.15, ge=0)  # noise std on pixels in [0, 1] (SmoothGrad: 10-20% of range)


class IGParams(Strict):
    steps: int = Field(4, ge=1)  # midpoint Riemann points from the black baseline


class FinerCAMParams(Strict):
    similar: int = Field(3, ge=1)  # most similar classes compared against (closest logits)
    alpha: float = Field(1.0, ge=0)  # weight of the similar classes' logits


class ExplainerParams(Strict):
    name: str = "gradcam"
    smoothgrad: SmoothGradParams = SmoothGradParams()
    ig: IGParams = IGParams()
    finercam: FinerCAMParams = FinerCAMParams()


class GuardParams(Strict):
    """Catastrophic-overfitting guard (Wong et al. 2020): accuracy under ``eval.attack`` on a
    fixed validation batch every ``every`` steps; with the guard on, best.pt is the checkpoint of
    the highest guard accuracy, and a drop of ``collapse_drop`` points below it logs a warning."""

    every: int = Field(0, ge=0)  # steps between checks; 0 = off
    examples: int = Field(128, ge=1)  # validation images (a stratified subset)
    collapse_drop: float = Field(20.0, gt=0)  # percentage points below the best = a collapse


# Train keys that choose where and how a run executes, not what it computes: a run resumes across
# them (its checkpoint's fingerprint leaves them out) and the DVC train stages do not track them.
# Every other train key is tracked (tests/test_config.py checks dvc.yaml against this list).
RUNTIME_KEYS = ("progress", "out_dir", "num_threads", "backend", "max_failures", "storage_path",
                "resources_per_worker", "resume", "label_selector", "min_workers")


class TrainParams(Strict):
    method: str = "egat"
    domains: list[str] = []  # training domains; empty = the dataset's first domain
    # The images trained and validated on: observed, or the cue-free renders of the embedded
    # benchmark (the oracle: what shape alone reaches with the same budget).
    images: Literal["observed", "cue_free"] = "observed"
    # Which checkpoint best.pt (the evaluated model) is: the best in-domain validation accuracy
    # (val), the last step (last), or the best accuracy on the cue-free renders of the training
    # domains' validation split (cue_free_val: a counterfactual validation set; it never sees a
    # test domain). docs/protocol.md compares them.
    select: Literal["val", "last", "cue_free_val"] = "last"
    # the budget where oracle and ERM are 37 points apart (docs/protocol.md); the paper's: 5000
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)  # the one-cycle peak; paper scale (pretrained ResNet-50): 5e-5
    # constant, or onecycle: linear warm-up to lr at lr_peak of the steps, then linear decay to ~0
    # (the cyclic schedule of Wong et al. 2020's fast adversarial training)
    lr_schedule: Literal["constant", "onecycle"] = "onecycle"
    lr_peak: float = Field(0.4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(100, ge=1)
    val_batches: int = Field(0, ge=0)  # 0 = the whole validation split
    checkpoint_every: int = Field(100, ge=1)
    resume: bool = True  # continue from <run dir>/last.pt; false: discard it and start over
    seed: int = 0
    num_threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = leave torch's default
    backend: Literal["auto", "local", "ray"] = "auto"
    workers: int = Field(1, ge=1)
    # Ray Train elastic training: the fewest workers a run may continue on (Ray's
    # ScalingConfig(num_workers=(min_workers, workers))); null or 0 = a fixed size of workers.
    min_workers: int | None = None
    use_gpu: Literal["auto", "true", "false"] = "auto"
    out_dir: str = "runs"
    progress: bool = True
    # Validation metrics beyond cAcc, on the same val_batches ("aacc": accuracy under
    # eval.attack, "comp": Grad-CAM comprehensiveness; the embedded benchmark's "cue_mismatch":
    # accuracy on the images whose cue points to another class, "cue_free_aacc": accuracy under
    # eval.attack on the cue-free renders); Tune turns on what its objective needs.
    val_metrics: list[Literal["aacc", "comp", "cue_mismatch", "cue_free_aacc"]] = []
    # Ray Train (backend ray): recoveries from dead workers, Ray's run storage (null =
    # <out_dir>/_ray; a shared disk or s3://... on a multi-node cluster), Ray resources per
    # worker (empty = Ray's default: 1 CPU, or 1 GPU with use_gpu).
    max_failures: int = Field(1, ge=-1)
    storage_path: str | None = None
    resources_per_worker: dict[str, float] = {}
    # Ray node labels each worker's node must carry (Ray's ScalingConfig.label_selector): one
    # mapping for every worker, or a list with one per rank (rank 0 on on-demand nodes, the
    # others on spot ones); values match exactly. {} = any node.
    label_selector: dict[str, str] | list[dict[str, str]] = {}
    guard: GuardParams = GuardParams()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a GradScaler
    compile: bool = False  # torch.compile the backbone (not with double-backward methods)

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v):
        bad = {k: r for k, r in v.items() if r < 0}
        if bad:
            raise ValueError(f"resources must be >= 0, got {bad}")
        return v

    @field_validator("min_workers")
    @classmethod
    def _min_workers(cls, v, info):
        workers = info.data.get("workers")
        if v and workers is not None and not 1 <= v <= workers:
            raise ValueError(
                f"{v} is out of range: give 1..{workers} (train.workers) for an elastic run, "
                "or null/0 for a fixed size"
            )
        return v or None

    @property
    def elastic(self) -> bool:
        """Whether Ray may run this on fewer than ``workers`` workers (``min_workers``)."""
        return self.min_workers is not None and self.min_workers < self.workers

    @model_validator(mode="after")
    def _one_selector_per_worker(self):
        if self.elastic and isinstance(self.label_selector, list):
            raise ValueError(
                f"min_workers={self.min_workers} (elastic, {self.min_workers}..{self.workers} "
                "workers) cannot go with a label_selector list, one per rank: ranks change with "
                "the world size; give one mapping for all workers, or min_workers: null"
            )
        if isinstance(self.label_selector, list) and len(self.label_selector) != self.workers:
            raise ValueError(
                f"label_selector lists {len(self.label_selector)} selector(s) for "
                f"workers={self.workers}: give one per worker, or one mapping for all"
            )
        return self


class SweepParams(Strict):
    attacks: list[Literal["fgsm", "mifgsm", "pgd", "apgd"]] = ["fgsm", "mifgsm", "pgd", "apgd"]
    eps: list[float] = [0.01, 0.02, 0.03, 0.04]
    steps: int = Field(5, ge=1)  # CPU budget (docs/results/v3_make_run_breakdown.md); paper: 10
    max_examples: int = Field(100, ge=0)  # test images of the training domains; 0 = all
    nested: bool = True  # each eps attacks only the images every smaller eps left right

    _eps_fractions = field_validator("eps", mode="before")(lambda v: _fractions(v))
    _eps_increasing = field_validator("eps")(lambda v: _increasing_eps(v))


class FaithfulnessParams(Strict):
    ks: list[float] = [1, 5, 10, 20, 50]  # percent of pixels
    baseline: Literal["black", "blur", "mean"] = "black"  # what erased pixels become

    @field_validator("ks")
    @classmethod
    def _ks(cls, v):
        if not v or any(not 0 < k <= 100 for k in v):
            raise ValueError(f"ks must be percentages in (0, 100], got {v}")
        return v


class EvalParams(Strict):
    batch_size: int = Field(128, ge=1)
    max_examples: int = Field(0, ge=0)  # per domain test split (a stratified subset); 0 = all
    # Of those, the images the attack- and explanation-based metrics (aAcc, Comp/Suff, stability,
    # alignment) run on: a stratified subset; 0 = all. Forward-only metrics use every image.
    costly_examples: int = Field(200, ge=0)
    # ... per test domain outside the training domains; null = costly_examples. Their metrics are
    # means over those domains, so 100 each puts 300 images behind an OOD mean on the embedded
    # benchmark, more than the 200 behind an in-domain cell (docs/results/v5_make_run_breakdown.md).
    ood_costly_examples: int | None = Field(100, ge=0)
    attack: AttackParams = AttackParams()
    sweep: SweepParams = SweepParams()
    faithfulness: FaithfulnessParams = FaithfulnessParams()
    stability_top: float = Field(0.1, gt=0, le=1)
    explainer: str = "gradcam"  # explainer of Comp/Suff/stability/alignment (options: `explainer`)


class ChecklistParams(Strict):
    """The gradient-masking checks (a)-(e) of Carlini et al. 2019 (README, Robust evaluation)."""

    # (a) APGD-CE accuracy at these eps must not rise with eps and be <= max_final_acc at the last
    eps: list[float] = [2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255]
    max_final_acc: float = Field(1.0, ge=0, le=100)
    # (b) PGD with steps_factor x eval.attack.steps and `restarts` restarts vs eval.attack itself
    # (CPU budget: 2 restarts; PGD-100 x 5 took 11-15 s of a 20-25 s cell,
    # docs/results/v5_cpu_attack_check.md)
    steps_factor: int = Field(10, ge=1)
    restarts: int = Field(2, ge=1)
    # (e) cross-entropy at scan_points evenly spaced steps t * robust.attack.eps * sign(grad), t in
    # [0, 1]: the check passes when the loss rises on at least min_rising of the images
    scan_points: int = Field(9, ge=2)
    min_rising: float = Field(0.75, ge=0, le=1)
    # accuracy (points) by which a comparison of (a)-(d) may go the wrong way (sampling noise)
    tolerance: float = Field(0.0, ge=0)

    _eps_fractions = field_validator("eps", mode="before")(lambda v: _fractions(v))
    _eps_increasing = field_validator("eps")(lambda v: _increasing_eps(v))


class RobustAttackParams(AttackParams):
    """``robust.attack``: AutoAttack unless named otherwise (keys given without a name keep it), at
    the study's CPU budget (AutoAttack's own: ``targets: 9, queries: 5000``, and 100 steps)."""

    name: Literal["fgsm", "mifgsm", "pgd", "fgsm_rs", "free", "apgd", "apgdt", "square",
                  "autoattack"] = "autoattack"
    targets: int = Field(3, ge=1)
    queries: int = Field(200, ge=1)


class RobustParams(Strict):
    """AutoAttack and the masking checklist on one trained run (stage `evaluate`, after the
    evaluation)."""

    # a stratified (equal per class), seeded subset of the in-domain test split, or "all"
    subset: int | str = 20
    seed: int = 0
    attack: RobustAttackParams = RobustAttackParams()
    # (d) transfer: adversarial examples made on this method's run of the same domain and seed;
    # a run of transfer_from itself takes them from transfer_fallback's run
    transfer_from: str = "erm"
    transfer_fallback: str = "pgd_at"
    checklist: ChecklistParams = ChecklistParams()

    @field_validator("subset", mode="before")
    @classmethod
    def _subset(cls, v):
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(
            f"must be an integer >= 1 (images of a stratified subset of the test split) or 'all' "
            f"(the whole split), got {v!r}"
        )


class StudyParams(Strict):
    """The DVC train/evaluate matrix: methods x training domains x seeds."""

    # The embedded default is the smallest study that answers "does EGAT beat the baselines":
    # the floor (ERM), the robust baseline (PGD-AT) and EGAT: 18-33 minutes on 2 cores, by host
    # (docs/results/v5_make_run_fast_host.md). The whole comparison, every baseline (63 minutes;
    # ign left out, 30x an ERM step): README, "The full study".
    methods: list[str] = ["erm", "pgd_at", "egat"]
    train_domains: list[str] = ["grass"]
    seeds: list[int] = [0, 1, 2]
    # Variants shown beside the methods in Tables I and II as the ceiling (the oracle: ERM on the
    # cue-free renders); they must be in studies.train to have runs.
    references: list[str] = ["oracle"]


class VariantParams(Strict):
    """One extra training run of the studies: a method with params overrides (dotted keys)."""

    method: str
    overrides: dict[str, Any] = {}  # e.g. {explainer.name: ig, guides.variant: golden}


class CaseStudyParams(Strict):
    runs: list[str] = ["erm", "pgd_at", "egat"]  # Fig. 4 rows: study methods or variant names
    images: int = Field(4, ge=1)  # test images, one per class in turn
    domain: str | None = None  # test domain of the images; null = the first training domain


# ERM on the cue-free renders: what shape alone reaches with the study's budget.
ORACLE = VariantParams(method="erm", overrides={"train.images": "cue_free"})


def _noise_variant(sigma: float) -> str:
    return f"noisy_{sigma:g}"


def all_variants(params: Params) -> dict[str, VariantParams]:
    """``studies.variants`` plus those every study has unless it defines them: ``oracle`` (the
    ceiling of Tables I and II) and a ``noisy_<sigma>`` EGAT per ``guides.sigmas`` level."""
    derived = {"oracle": ORACLE, **{
        _noise_variant(sigma): VariantParams(
            method="egat", overrides={"guides.variant": "noisy", "guides.sigma": sigma})
        for sigma in params.guides.sigmas}}
    defined = params.studies.variants
    return {**defined, **{name: v for name, v in derived.items() if name not in defined}}


class StudiesParams(Strict):
    """Sensitivity (Table III), ablation (Table IV), runtime (Fig. 3), case study (Fig. 4)."""

    train: list[str] = ["oracle"]  # variants the DVC variant stages train and evaluate
    variants: dict[str, VariantParams] = {
        "oracle": ORACLE,
        "wo_egl": VariantParams(method="egat_wo_egl"),
        "wo_at": VariantParams(method="egat_wo_at"),
        **{name: VariantParams(method="egat", overrides={"explainer.name": name})
           for name in ("smoothgrad", "ig", "finercam")},
        "golden": VariantParams(method="egat", overrides={"guides.variant": "golden"}),
        # ImageNet backbones (Fig. 3) at reduced resolution: the 32 px images upsampled to 64 px
        **{name: VariantParams(method="egat", overrides={"model.name": name, "model.input_size": 64})
           for name in ("resnet50", "mobilenet_v2", "efficientnet_b0")},
        # fast EGAT (README, Speed): another training attack, the same loss; the guard keeps
        # best.pt. fgsm_rs is Wong et al.'s recipe: FGSM-RS, a cyclic lr with a higher peak, fewer steps.
        "fgsm_rs": VariantParams(method="egat", overrides={
            "attack.name": "fgsm_rs", "train.guard.every": 50, "train.guard.examples": 64,
            "train.lr_schedule": "onecycle", "train.lr": 0.003, "train.steps": 110}),
        "free_at": VariantParams(method="egat", overrides={"attack.name": "free", "attack.replays": 4,
                                                          "train.guard.every": 50}),
    }  # plus those all_variants derives: oracle (when left out) and noisy_<sigma>
    # Table III rows (study methods or variants)
    sensitivity: list[str] = ["egat", "smoothgrad", "ig", "finercam", "noisy_0.1", "noisy_0.3", "golden"]
    ablation: list[str] = ["erm", "wo_egl", "wo_at", "egat"]  # Table IV rows
    runtime: list[str] = [  # Fig. 3 points beyond study.methods
        "resnet50", "mobilenet_v2", "efficientnet_b0", "fgsm_rs", "free_at"]
    case_study: CaseStudyParams = CaseStudyParams()

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v):
        bad = [name for name in v if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)]
        if bad:
            raise ValueError(f"variant names {bad} must be letters, digits, '_', '.', '-'")
        return v


# The lambdas (and the training attack's eps) that `egat tune` may search, and where each lives.
TUNE_KEYS = {
    "lambda_adv": "methods.{method}.lambda_adv",
    "lambda_egl": "methods.{method}.lambda_egl",
    "lambda_mix": "methods.{method}.lambda_mix",
    "lambda_sparse": "methods.{method}.lambda_sparse",
    "eps": "attack.eps",
}


class SearchRange(Strict):
    """One searched value: a range [low, high] (log-uniform when ``log``) or a list of ``values``."""

    low: float | None = None
    high: float | None = None
    log: bool = True
    values: list[float] | None = None

    _frac = field_validator("low", "high", mode="before")(lambda v: _fraction(v))

    @model_validator(mode="after")
    def _shape(self):
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high or values, not both")
            if not self.values:
                raise ValueError("values is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or a list of values)")
        if self.low > self.high:
            raise ValueError(f"low={self.low} > high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class TuneParams(Strict):
    """`egat tune`: Ray Tune's search over EGAT's lambdas (docs in params.yaml)."""

    method: str = "egat"
    space: dict[str, SearchRange | None] = {
        "lambda_adv": SearchRange(low=0.25, high=16.0, log=True),
        "lambda_egl": SearchRange(low=0.3, high=30.0, log=True),
        "lambda_mix": SearchRange(low=0.1, high=4.0, log=True),
        "lambda_sparse": None,
        "eps": None,
    }
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    # Maximised on validation data only. On the embedded benchmark, the default's terms are ones
    # the shortcut cannot earn: cAcc where the cue misleads, aAcc on the cue-free renders (a
    # patch that survives the attack earns val_aacc: docs/results/v2_tune.md).
    objective: Literal["val_cue_mismatch_cacc+val_cue_free_aacc", "val_cue_free_cacc+val_aacc",
                       "val_cacc+val_aacc", "val_cacc", "val_comp"] = (
        "val_cue_mismatch_cacc+val_cue_free_aacc")
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(0, ge=0)  # 0 = as many as the cluster's resources hold
    steps: int | None = Field(None, ge=1)  # per trial; null = train.steps
    eval_every: int | None = Field(None, ge=1)  # null = train.eval_every
    val_batches: int = Field(2, ge=0)  # validation batches per report (0 = the whole split)
    grace_period: int | None = Field(100, ge=1)  # ASHA's first rung in steps; null = steps / 4
    reduction_factor: float = Field(2.0, gt=1)
    workers: int | None = Field(None, ge=1)  # per trial; null = train.workers
    resources_per_worker: dict[str, float] | None = None  # null = train.resources_per_worker
    trial_driver_cpus: float = Field(0.0, ge=0)  # each trial's driver only waits on its workers
    seed: int = 0
    name: str = "egat-tune"
    best_params_file: str = "tune/best_params.yaml"

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v):
        unknown = sorted(set(v) - set(TUNE_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; searchable: {', '.join(TUNE_KEYS)}")
        return v

    def searched(self) -> dict[str, SearchRange]:
        """The searched keys (null entries keep the params' value)."""
        return {k: r for k, r in self.space.items() if r is not None}


class Params(Strict):
    data: DataParams = DataParams()
    guides: GuideParams = GuideParams()
    model: ModelParams = ModelParams()
    explainer: ExplainerParams = ExplainerParams()
    attack: TrainingAttackParams = TrainingAttackParams()
    train: TrainParams = TrainParams()
    methods: dict[str, dict[str, Any]] = {}  # per-method hyperparameters: each method's Config
    eval: EvalParams = EvalParams()
    study: StudyParams = StudyParams()
    robust: RobustParams = RobustParams()
    studies: StudiesParams = StudiesParams()
    # Keys owned by other stages (report, studies) pass through untouched.
    report: dict[str, Any] = {}
    tune: TuneParams = TuneParams()


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {item!r}: the value is not valid YAML: {yaml_problem(exc)}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (PyYAML's message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(str(getattr(exc, "problem", None) or exc).split()) + where


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {part!r} is not a group of keys")
        node[path[-1]] = value
    return raw


def parse_params(raw: dict, source: str = "params") -> Params:
    """``raw`` validated against the schema (names unchecked: egat/build.py's ``params_from_dict``
    checks them too)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str, prefix: str = "invalid params: ") -> str:
    """One line: '<source>: invalid params: <key.path>: <problem>; ...'. Nested method configs pass
    their key prefix as ``source`` and an empty ``prefix``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) if str(p).isprintable() else repr(p) for p in err["loc"])
        if not prefix:
            loc = f"{source}.{loc}" if loc else source
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return (f"{source}: {prefix}" if prefix else "") + "; ".join(parts)


def read_params(path: str | Path | None = "params.yaml",
                overrides: list[str] | None = None) -> tuple[dict, str]:
    """(raw params, their source): the file read and overridden, not yet validated.
    ``path=None`` starts from the built-in defaults."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ParamsError(f"{p}: params file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{p}: not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{p}: expected a mapping of stage groups at the top level")
    return apply_overrides(raw, overrides or []), source
