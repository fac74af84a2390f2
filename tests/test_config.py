from pathlib import Path

import pytest
import yaml

from egat.build import load_params, method_hparams, params_from_dict
from egat.config import RUNTIME_KEYS, TUNE_KEYS, Params, TrainParams, all_variants
from egat.errors import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    p = Params()
    assert p.train.method == "egat" and p.model.name == "small_resnet"
    assert p.attack.eps == pytest.approx(8 / 255)


def test_fraction_strings_are_parsed():
    p = params_from_dict({"attack": {"eps": "8/255", "alpha": "2/255"}})
    assert p.attack.eps == pytest.approx(8 / 255) and p.attack.alpha == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"train": {"method": "nope"}}, "train.method='nope' is unknown; valid: "),
        ({"model": {"name": "vgg"}}, "model.name='vgg' is unknown; valid: "),
        ({"attack": {"eps": -0.1}}, "attack.eps: Input should be greater than or equal to 0"),
        ({"methods": {"egat": {"lambda_adv": -1}}}, "lambda_adv"),
        ({"methods": {"nope": {}}}, "methods.nope='nope' is unknown"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"trian": {}}, "trian: unknown key"),
        ({"data": {"split": [0.5, 0.5, 0.5]}}, "sum to 1"),
        ({"train": {"workers": 2, "min_workers": 3}},
         "train.min_workers: 3 is out of range: give 1..2 (train.workers) for an elastic run, "
         "or null/0 for a fixed size"),
        ({"train": {"workers": 2, "min_workers": -1}}, "train.min_workers: -1 is out of range"),
        ({"train": {"workers": 2, "min_workers": 1, "label_selector": [{"n": "a"}, {"n": "b"}]}},
         "train: min_workers=1 (elastic, 1..2 workers) cannot go with a label_selector list, "
         "one per rank"),
    ],
)
def test_bad_params_name_the_key(raw, needle):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw, source="params.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid params: ")
    assert "\n" not in str(err.value)


def test_an_unknown_preset_is_the_only_error():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"methods": {"egat": {"preset": "papr"}}}, source="params.yaml")
    assert str(err.value) == ("params.yaml: invalid params: methods.egat.preset: Input should be "
                              "'default', 'study_v2' or 'paper'")


def test_overrides_and_missing_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  steps: 5\n")
    p = load_params(f, ["train.steps=7", "methods.egat.preset=paper"])
    assert p.train.steps == 7
    cfg = method_hparams(p, "egat")
    assert (cfg.lambda_adv, cfg.lambda_sparse) == (0.5, 1.0)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ParamsError, match="expected key=value"):
        load_params(f, ["train.steps"])


def test_presets_and_explicit_values():
    p = params_from_dict({"methods": {"egat": {"lambda_adv": 2}}})
    cfg = method_hparams(p)
    assert (cfg.lambda_adv, cfg.lambda_egl, cfg.lambda_mix, cfg.lambda_sparse) == (2, 3.372, 0.3141, 0.2)
    tables = method_hparams(params_from_dict({"methods": {"egat": {"preset": "study_v2"}}}))
    assert (tables.lambda_adv, tables.lambda_egl, tables.lambda_mix) == (6, 10, 1)
    assert method_hparams(p, "egat_wo_at").lambda_adv == 0
    wo = method_hparams(p, "egat_wo_egl")
    assert wo.lambda_egl == 0 and wo.mix_explanation is False


def test_min_workers_makes_a_run_elastic_only_below_workers():
    def train(**t):
        return params_from_dict({"train": t}).train

    assert [train(workers=2, min_workers=m).elastic for m in (None, 0, 1, 2)] == [
        False, False, True, False]
    assert train(workers=2, min_workers=0).min_workers is None
    assert train(workers=3, min_workers=2, label_selector={"n": "spot"}).elastic


# --- one source of defaults: the code's, which params.yaml repeats --------------------------------

def leaves(tree, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a nested mapping (an empty mapping is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def disagreements(path: Path) -> list[str]:
    """The keys where the params file at ``path`` and the code's defaults (``Params()``) differ,
    each with both values; methods compare by their resolved hyperparameters (presets applied)."""
    shown, code = load_params(path), Params()
    pairs = [(leaves(shown.model_dump(mode="json", exclude={"methods"})),
              leaves(code.model_dump(mode="json", exclude={"methods"})))]
    for name in sorted(shown.methods):
        pairs.append((leaves(method_hparams(shown, name).model_dump(mode="json"), f"methods.{name}"),
                      leaves(method_hparams(code, name).model_dump(mode="json"), f"methods.{name}")))
    missing = object()
    return [f"{key}: file {a.get(key, '<absent>')!r}, code {b.get(key, '<absent>')!r}"
            for a, b in pairs for key in sorted(a.keys() | b.keys())
            if a.get(key, missing) != b.get(key, missing)]


def test_params_yaml_shows_the_code_defaults():
    assert disagreements(ROOT / "params.yaml") == []


def test_a_value_that_differs_from_the_code_default_is_named(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["steps"] = 401
    raw["methods"]["ign"]["m"] = 6
    raw["methods"]["egat"]["preset"] = "paper"  # a preset changes the weights left null
    raw["studies"]["variants"]["resnet50"]["overrides"].pop("model.input_size")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    found = disagreements(tmp_path / "params.yaml")
    assert "train.steps: file 401, code 400" in found and "methods.ign.m: file 6, code 5" in found
    assert "methods.egat.lambda_adv: file 0.5, code 5.024" in found
    assert "studies.variants.resnet50.overrides.model.input_size: file '<absent>', code 64" in found
    assert len(found) == 8  # + methods.egat.preset, lambda_egl, lambda_mix and lambda_sparse


def test_silent_keys_keep_the_study_values():
    p = params_from_dict({"attack": {"name": "fgsm_rs"}, "robust": {"attack": {"steps": 20}},
                          "methods": {"egat": {"lambda_adv": 2}}})
    assert (p.attack.steps, p.attack.alpha, p.eval.attack.steps) == (2, 0.0392, 10)
    assert (p.robust.attack.name, p.robust.attack.targets, p.robust.attack.queries) == (
        "autoattack", 3, 200)
    assert method_hparams(p, "egat").lambda_egl == 3.372


def test_the_tune_space_holds_the_study_values():
    """Each searched range contains the value a run has when Tune does not search it."""
    p = Params()
    for key, space in p.tune.searched().items():
        group, *path = TUNE_KEYS[key].format(method=p.tune.method).split(".")
        node = method_hparams(p, path.pop(0)) if group == "methods" else getattr(p, group)
        for part in path:
            node = getattr(node, part)
        if space.values is not None:
            assert node in space.values, key
        else:
            assert space.low <= node <= space.high, (key, node, space)


def test_derived_variants_are_computed_not_stored():
    p = params_from_dict({"guides": {"sigmas": [0.2]}, "studies": {
        "variants": {"mine": {"method": "egat"}}, "train": ["mine", "oracle", "noisy_0.2"],
        "sensitivity": [], "ablation": [], "runtime": [], "case_study": {"runs": []}}})
    assert list(all_variants(p)) == ["mine", "oracle", "noisy_0.2"]
    assert all_variants(p)["noisy_0.2"].overrides == {"guides.variant": "noisy", "guides.sigma": 0.2}
    assert all_variants(p)["oracle"].overrides == {"train.images": "cue_free"}
    assert list(p.studies.variants) == ["mine"]  # validation added nothing
    defined = params_from_dict({"studies": {"variants": {
        **Params().model_dump()["studies"]["variants"],
        "noisy_0.1": {"method": "egat", "overrides": {"guides.variant": "golden"}}}}})
    assert all_variants(defined)["noisy_0.1"].overrides == {"guides.variant": "golden"}
    assert list(all_variants(Params()))[-2:] == ["noisy_0.1", "noisy_0.3"]


# --- dvc.yaml tracks the params its stages read ----------------------------------------------------

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
CELL_KEYS = {"method", "domains", "seed"}  # each matrix item's command sets them (stages.run_params)


def tracked(stage: str) -> list[str]:
    """The params.yaml keys of a stage's ``params`` list (plain keys or a ``params.yaml:`` list)."""
    keys = []
    for entry in DVC["stages"][stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:
            assert set(entry) == {"params.yaml"}, entry
            keys += entry["params.yaml"]
    return keys


def test_every_tracked_key_is_in_params_yaml():
    """`dvc repro` fails on a tracked key params.yaml lacks (and `dvc exp run -S` cannot set it)."""
    shown = yaml.safe_load((ROOT / "params.yaml").read_text())
    methods = shown["study"]["methods"]
    for stage in DVC["stages"]:
        for key in tracked(stage):
            for name in methods if "${item.method}" in key else [None]:
                node = shown
                for part in key.replace("${item.method}", str(name)).split("."):
                    assert isinstance(node, dict) and part in node, f"{stage}: {key} ({name})"
                    node = node[part]


def test_the_training_stages_track_every_train_key_but_the_runtime_ones():
    """A train key either shapes what a run computes (DVC reruns the stage when it changes, and a
    run cannot resume across it) or is in RUNTIME_KEYS (neither). Not tracked, though read: the
    prepared data's keys beyond image_size/augment (DVC hashes data/ as a dependency) and
    eval.batch_size/eval.attack (validation and the guard; tracking them would retrain every run
    whenever the evaluation attack changes)."""
    fields = set(TrainParams.model_fields)
    assert set(RUNTIME_KEYS) <= fields and not CELL_KEYS & set(RUNTIME_KEYS)
    for stage in ("train", "variant_train"):
        keys = [k.removeprefix("train.") for k in tracked(stage) if k.startswith("train.")]
        assert sorted(keys) == sorted(fields - set(RUNTIME_KEYS) - CELL_KEYS), stage
    # a variant's overrides and any method's hyperparameters shape its run
    assert [k for k in tracked("train") if not k.startswith("methods.")] == [
        k for k in tracked("variant_train") if k not in ("methods", "studies.variants")]
    # a method's evaluation also runs the robustness checks (robust.*); a variant's does not
    assert tracked("variant_evaluate") == [
        *(k for k in tracked("evaluate") if k != "robust"), "studies.variants"]
