"""Bad params and paths are refused before any side effect: no MLflow run, folder or file is
created for a request that ends in an `error:` line."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from egat.errors import EgatError
from tests.helpers import tiny_folder_data
from tests.test_cli import egat_in_process


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> dict:
    return tiny_folder_data(tmp_path_factory.mktemp("cells"))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def all_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


@pytest.mark.parametrize("verb", ["train-cell", "evaluate-cell"])
def test_a_cell_with_an_unknown_domain_names_study_train_domains_and_leaves_no_run(
        verb, folder_data, tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({**folder_data, "train": {"progress": False}}))
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, verb, "--config", str(cfg),
                                "--method", "erm", "--domain", "nowhere", "--seed", "0")
    line = one_error_line(err)
    assert code == 2
    assert line.startswith("error: study.train_domains: 'nowhere' is not a domain of the folder data")
    assert "valid: d1, d2 (e.g. dvc exp run -S 'study.train_domains=[d1]')" in line
    assert all_runs(uri) == []  # no FAILED run train/erm/nowhere/seed0
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evals").exists()


@pytest.mark.parametrize("key, value, valid", [
    ("select", "cue_free_val", "use val, last"), ("images", "cue_free", "use observed")])
def test_a_cue_free_request_on_data_without_renders_names_the_key_and_leaves_no_run(
        key, value, valid, folder_data, tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({**folder_data, "train": {"progress": False, key: value}}))
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "train-cell", "--config", str(cfg),
                                "--method", "erm", "--domain", "d1", "--seed", "0")
    assert code == 2
    assert one_error_line(err) == (f"error: train.{key}={value} needs cue-free renders, which only "
                                   f"the embedded benchmark has; {valid}")
    assert all_runs(uri) == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("metric, message", [
    ("cue_free_aacc", "needs cue-free renders, which only the embedded benchmark has"),
    ("cue_mismatch", "needs each image's cue class, which only the embedded benchmark with a cue has")])
def test_a_cue_validation_metric_on_data_without_cues_names_it_and_leaves_no_run(
        metric, message, folder_data, tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({**folder_data, "train": {"progress": False, "val_metrics": [metric]}}))
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "train-cell", "--config", str(cfg),
                                "--method", "erm", "--domain", "d1", "--seed", "0")
    assert code == 2
    assert one_error_line(err) == f"error: train.val_metrics={metric} {message}; use aacc, comp"
    assert all_runs(uri) == [] and not (tmp_path / "runs").exists()


def test_a_cue_tune_objective_on_data_without_cues_is_refused_before_ray(folder_data, tmp_path):
    from egat.build import params_from_dict
    from egat.tune import check_objective

    params = params_from_dict({**folder_data, "study": {"train_domains": ["d1"]},
                               "tune": {"objective": "val_cue_mismatch_cacc+val_cue_free_aacc"}})
    with pytest.raises(EgatError) as e:
        check_objective(params)
    assert str(e.value) == ("tune.objective=val_cue_mismatch_cacc+val_cue_free_aacc: train.val_metrics="
                            "cue_mismatch needs each image's cue class, which only the embedded benchmark "
                            "with a cue has; use aacc, comp; or use val_cacc+val_aacc")
    check_objective(params_from_dict({**folder_data, "tune": {"objective": "val_cacc+val_aacc"},
                                      "study": {"train_domains": ["d1"]}}))
    with pytest.raises(EgatError) as e:  # the default study's grass is not a domain of this data
        check_objective(params_from_dict({**folder_data, "tune": {"objective": "val_cacc+val_aacc"}}))
    assert str(e.value) == ("tune: train.domains: unknown domain(s) ['grass']; valid: d1, d2 (a trial "
                            "trains on train.domains, or on study.train_domains' first)")


def test_prepare_with_a_missing_folder_root_names_the_key_and_writes_nothing(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "params.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "folder", "folder_root": str(tmp_path / "photos"),
                                            "dir": str(tmp_path / "data")}}))
    code, err = egat_in_process(capsys, monkeypatch, tmp_path, "prepare", "--config", str(cfg))
    assert code == 2
    assert one_error_line(err) == (
        f"error: data.folder_root={tmp_path / 'photos'}: no such folder; expected your "
        "<root>/<domain>/<class>/<image> tree"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no empty data/folder/
