import pytest

from egat.build import load_params, method_hparams, params_from_dict
from egat.config import Params
from egat.errors import ParamsError


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
    assert (cfg.lambda_adv, cfg.lambda_egl, cfg.lambda_mix, cfg.lambda_sparse) == (2, 1, 1, 0.2)
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
