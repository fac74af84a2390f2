"""Resources: evaluation streams its batches (memory flat in the test-set size), and running out
of GPU memory ends in one line that names the batch-size param to lower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from egat.build import build_attack, build_explainer, params_from_dict
from egat.cli import main
from egat.errors import EgatError
from egat.evaluation import PartClock, evaluate_domain, evaluate_model
from egat.build import build_explainer
from egat.metrics import alignment_scores, evaluate_accuracy, faithfulness, spearman_rows, top_intersection
from egat.models import Classifier, model_registry
from tests.helpers import tiny_classifier, tiny_folder_data

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"eval": {"max_examples": 0, "attack": {"steps": 2, "random_start": False},
                 "faithfulness": {"ks": [10, 50], "baseline": "black"}, "stability_top": 0.2}}


class NoiseImages(Dataset):
    """Seeded images and masks made on the fly, so that the test set itself costs no memory."""

    def __init__(self, n: int, size: int = 32):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, self.size, self.size, generator=g)
        mask = (torch.rand(1, self.size, self.size, generator=g) > 0.7).float()
        return {"image": image, "label": torch.tensor(i % 3), "mask": mask}


def evaluate(n: int, batch_size: int) -> dict[str, float]:
    params = params_from_dict(EVAL)
    loader = DataLoader(NoiseImages(n), batch_size=batch_size)
    return evaluate_domain(tiny_classifier(), params, loader, torch.device("cpu"))


def test_the_part_clock_times_each_part_and_changes_no_metric():
    params = params_from_dict(EVAL)
    loader = DataLoader(NoiseImages(12), batch_size=5)
    clock = PartClock()
    with clock.part("total"):
        timed = evaluate_domain(tiny_classifier(), params, loader, torch.device("cpu"), clock=clock)
    assert timed == evaluate(12, batch_size=5)
    seconds = clock.as_dict()
    assert list(seconds) == [*PartClock.PARTS, "total"]
    for part in ("clean", "counterfactual", "pgd", "comp_suff", "explanations"):
        assert seconds[part] > 0, part  # the masks make object-erased cAcc and alignment run
    assert seconds["sweep"] == 0.0  # not part of one domain's pass
    assert sum(seconds[p] for p in PartClock.PARTS) <= seconds["total"]


def test_streamed_evaluation_is_batch_size_free_and_matches_each_metric_alone():
    streamed = evaluate(40, batch_size=7)
    assert streamed == pytest.approx(evaluate(40, batch_size=40), rel=1e-5)

    # Each metric alone: validation's accuracy and Comp/Suff passes, and the stability and
    # alignment scorers on all 40 images as one batch.
    params, model = params_from_dict(EVAL), tiny_classifier().eval()
    loader = DataLoader(NoiseImages(40), batch_size=16)
    attack, explainer = build_attack(model, params.eval.attack), build_explainer("gradcam", model)
    acc = evaluate_accuracy(model, loader, "cpu", {"pgd": attack})
    faith = faithfulness(model, explainer, loader, "cpu", ks=[10, 50])
    everything = next(iter(DataLoader(NoiseImages(40), batch_size=40)))
    x, y = everything["image"], everything["label"]
    pred = model(x).argmax(1)
    maps = explainer.attribute(x, pred).flatten(1)
    adversarial_maps = explainer.attribute(attack(x, y), pred).flatten(1)
    hits, mass = alignment_scores(explainer.attribute(x, y), everything["mask"])
    alone = {"cacc": acc["clean"], "aacc": acc["pgd"], "comp": faith["comp"], "suff": faith["suff"],
             "spearman": float(spearman_rows(maps, adversarial_maps).nanmean()),
             "top_intersection": float(top_intersection(maps, adversarial_maps, 0.2).mean()),
             "pointing_game": float(hits.double().mean()), "mass_in_mask": float(mass.mean()),
             "n": 40, "n_costly": 40}
    assert {k: streamed[k] for k in alone} == pytest.approx(alone, rel=1e-5)
    assert set(streamed) - set(alone) == {"comp_sd", "suff_sd", "object_erased_cacc"}


PEAK_RSS = """
import re, sys, torch
torch.set_num_threads(1)
from tests.test_resources import evaluate
evaluate(128, batch_size=64)  # warm-up: lazy imports and allocator pools
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: imports are not measured
evaluate(int(sys.argv[1]), batch_size=64)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def peak_rss_mib(n: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(n)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split()[-1]) / 1024  # kB -> MiB


@pytest.mark.slow
def test_evaluation_memory_is_flat_in_the_test_set_size():
    # 16x the images: keeping one (3, 32, 32) float tensor per image would add 48 MiB.
    small, large = peak_rss_mib(256), peak_rss_mib(4096)
    assert large - small < 16, f"peak RSS {small:.0f} MiB at 256 images, {large:.0f} MiB at 4096"


class _OutOfMemoryBackbone(nn.Module):
    """Raises what a CUDA allocation failure raises (torch.OutOfMemoryError), on any device."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _oom_classifier(num_classes: int, dropout: float, imagenet: bool) -> Classifier:
    return Classifier(_OutOfMemoryBackbone(), 4, num_classes, dropout=dropout)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> dict:
    return tiny_folder_data(tmp_path_factory.mktemp("oom"))


def test_out_of_memory_in_training_names_train_batch_size(folder_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(model_registry._entries, "oom_net", _oom_classifier)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({**folder_data, "model": {"name": "oom_net"},
                                      "train": {"method": "erm", "batch_size": 16, "steps": 2}}))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "out of GPU memory in training (CUDA out of memory" in err
    assert "lower train.batch_size (now 16), e.g. `--set train.batch_size=8`" in err


def test_out_of_memory_in_evaluation_names_eval_batch_size(folder_data):
    params = params_from_dict({**folder_data, "eval": {"batch_size": 50}})
    model = _oom_classifier(3, 0.0, False)
    with pytest.raises(EgatError, match=r"in evaluation .*lower eval.batch_size \(now 50\).*=25"):
        evaluate_model(model, params, ["d1"])
