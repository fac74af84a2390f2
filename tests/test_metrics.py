"""Metrics against values computed by hand on tiny models, maps and masks: the per-image scorers
and the loop that evaluation (egat/evaluation.py) and validation run them in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from egat.attacks import PGD
from egat.build import params_from_dict
from egat.evaluation import costly_scores, evaluate_domain
from egat.metrics import (
    accumulate,
    alignment_scores,
    correct,
    cue_scores,
    descending_ranks,
    erasure_scores,
    evaluate_accuracy,
    faithfulness,
    object_erased_correct,
    robust,
    spearman_rows,
    stability_scores,
    top_intersection,
)
from egat.metrics.catalog import METRIC_NAMES, METRICS, image_count
from egat.models.classifier import Classifier


def close(value: float):
    """Equality up to float32 rounding of probabilities, in the x100 units of comp/suff."""
    return pytest.approx(value, abs=1e-4)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def linear_pixel_model(weights: list[list[float]]) -> Classifier:
    """A Classifier whose logits are ``weights @ (mean R, mean G, mean B)``: identity backbone, no
    normalisation, no bias, so every logit is a known linear function of the pixels.
    """
    model = Classifier(nn.Identity(), 3, len(weights), dropout=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(weights))
        model.fc.bias.zero_()
    return model


def loader_of(images, labels, masks=None, batch_size=2):
    """A list of dict batches, the shape the metrics stream over."""
    batches = []
    for start in range(0, len(images), batch_size):
        batch = {"image": images[start : start + batch_size]}
        batch["label"] = labels[start : start + batch_size]
        if masks is not None:
            batch["mask"] = masks[start : start + batch_size]
        batch["domain"] = ["d0"] * len(batch["label"])  # non-tensor entries are ignored
        batches.append(batch)
    return batches


class FixedExplainer:
    """``attribute`` returns a fixed map per class: maps[target] -> (B, h, w)."""

    def __init__(self, maps: dict[int, torch.Tensor]):
        self.maps = maps
        self.targets: list[list[int]] = []

    def attribute(self, inputs, target, create_graph=False):
        self.targets.append(target.tolist())
        return torch.stack([self.maps[int(c)] for c in target])


class RedChannelExplainer:
    """``attribute`` returns the red channel of the input itself: (B, H, W)."""

    def attribute(self, inputs, target, create_graph=False):
        return inputs[:, 0]


def scores_of(model, explainer, attack, images, labels, masks=None, ks=(25, 50), top=0.5):
    """:func:`costly_scores` of one batch, as evaluation calls it (eval mode, black baseline)."""
    model.eval()
    with torch.no_grad():
        probs = model(images).softmax(1)
    return costly_scores(model, explainer, attack, images, labels, probs, masks, ks=list(ks),
                         baseline="black", top=top)


# ------------------------------------------------------------------------------- the loop


def test_accumulate_sums_per_name_in_order_of_first_appearance():
    batches = [{"image": torch.zeros(2, 1), "v": torch.tensor([1.0, 2.0])},
               {"image": torch.zeros(3, 1), "v": torch.tensor([3.0, 4.0, 5.0])}]

    def score(batch):  # "late" scores only the second batch, and one image of it
        out = {"v": batch["v"]}
        if len(batch["v"]) == 3:
            out = {"late": batch["v"][:1] > 0, **out}
        return out

    sums = accumulate(batches, "cpu", score)
    assert list(sums.sums) == ["v", "late"]
    assert sums.means() == {"v": 3.0, "late": 1.0} and sums.counts == {"v": 5, "late": 1}
    # max_examples cuts the last batch to fit: 1, 2 and 3 (which "late" does not score)
    assert accumulate(batches, "cpu", score, max_examples=3).means() == {"v": 2.0}
    empty = accumulate(batches, "cpu", lambda b: {"none": b["v"][:0]})
    assert empty.counts == {"none": 0} and empty.means() == {}


# ----------------------------------------------------------------------------- accuracy


def coloured_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Pure red, green, blue, red images; labels 0, 1, 0, 0 -> the RGB model gets 3 of 4 right."""
    images = torch.zeros(4, 3, 4, 4)
    for i, channel in enumerate([0, 1, 2, 0]):
        images[i, channel] = 1.0
    return images, torch.tensor([0, 1, 0, 0])


RGB_MODEL = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # predicts the image's colour


def test_clean_accuracy_on_known_predictions():
    images, labels = coloured_images()
    model = linear_pixel_model(RGB_MODEL).eval()
    assert correct(model, images, labels).tolist() == [True, True, False, True]
    loader = loader_of(images, labels)
    assert evaluate_accuracy(model, loader, "cpu")["clean"] == 75.0
    # red, green: both right
    assert evaluate_accuracy(model, loader, "cpu", max_examples=2)["clean"] == 100.0
    assert evaluate_accuracy(model, loader, "cpu", max_examples=3)["clean"] == pytest.approx(200 / 3)


def test_an_attack_that_does_nothing_gives_aacc_equal_to_cacc():
    images, labels = coloured_images()
    model = linear_pixel_model(RGB_MODEL).eval()
    identity = lambda x, y: x  # noqa: E731
    assert torch.equal(correct(model, identity(images, labels), labels), correct(model, images, labels))
    result = evaluate_accuracy(model, loader_of(images, labels), "cpu", {"adversarial": identity})
    assert result["adversarial"] == result["clean"]


def test_evaluate_accuracy_reports_every_attack_in_one_pass():
    images, labels = coloured_images()
    model = linear_pixel_model(RGB_MODEL)
    to_blue = lambda x, y: torch.zeros_like(x).index_fill_(1, torch.tensor([2]), 1.0)  # noqa: E731
    result = evaluate_accuracy(
        model, loader_of(images, labels), "cpu", {"none": lambda x, y: x, "blue": to_blue}
    )
    # every image becomes blue (class 2); no label is 2
    assert result == {"clean": 75.0, "none": 75.0, "blue": 0.0}


def test_an_attack_runs_only_on_the_clean_correct_images_and_never_repairs_a_mistake():
    images, labels = coloured_images()  # the blue image (index 2, label 0) is misclassified
    model = linear_pixel_model(RGB_MODEL)
    seen = []

    def to_label_colour(x, y):  # an "attack" that makes every image it is given correct
        seen.append(len(x))
        out = torch.zeros_like(x)
        out[torch.arange(len(x)), y] = 1.0
        return out

    result = evaluate_accuracy(model, loader_of(images, labels), "cpu", {"repair": to_label_colour})
    assert seen == [2, 1]  # batches (red, green), (blue, red): the blue one is already wrong
    assert result == {"clean": 75.0, "repair": 75.0}  # the mistake stays a mistake
    model.eval()  # as evaluate_accuracy runs it (dropout off)
    clean = correct(model, images, labels)
    assert robust(model, to_label_colour, images, labels, clean).tolist() == [True, True, False, True]
    assert seen == [2, 1, 3]
    nothing = torch.zeros(4, dtype=torch.bool)  # no correct image: the attack is not called
    assert robust(model, to_label_colour, images, labels, nothing).tolist() == [False] * 4
    assert seen == [2, 1, 3]


def test_a_nested_attack_runs_only_on_the_survivors_of_the_earlier_one():
    images, labels = coloured_images()  # clean: right, right, wrong (blue), right
    model = linear_pixel_model(RGB_MODEL)
    seen = {"small": [], "large": []}

    def turns_blue(name, channel):  # an "attack" that turns the images of one colour blue
        def attack(x, y):
            seen[name].append(len(x))
            out = x.clone()
            out[x[:, channel, 0, 0] == 1] = images[2]
            return out
        return attack

    attacks = {"small": turns_blue("small", 0), "large": turns_blue("large", 1)}
    alone = evaluate_accuracy(model, loader_of(images, labels, batch_size=4), "cpu", attacks)
    assert alone == {"clean": 75.0, "small": 25.0, "large": 50.0}  # "small" fools both reds
    assert seen == {"small": [3], "large": [3]}
    seen = {"small": [], "large": []}
    nested = evaluate_accuracy(model, loader_of(images, labels, batch_size=4), "cpu", attacks,
                               survivors_of={"large": "small"})
    assert nested == {"clean": 75.0, "small": 25.0, "large": 0.0}  # fooled by either: not robust
    assert seen == {"small": [3], "large": [1]}  # only the green image survived "small"
    with pytest.raises(ValueError, match=r"survivors_of\['small'\] = 'large' must name an attack "
                                         r"listed before 'small'"):
        evaluate_accuracy(model, loader_of(images, labels), "cpu", attacks,
                          survivors_of={"small": "large"})


def test_accuracy_runs_in_eval_mode_and_restores_the_mode():
    images, labels = coloured_images()
    model = linear_pixel_model(RGB_MODEL).train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    # dropout 0.5 in train mode would zero features at random; in eval the answer is exact
    assert evaluate_accuracy(model, loader_of(images, labels), "cpu")["clean"] == 75.0
    assert seen and not any(seen)
    assert model.training and model.dropout.training


def test_accuracy_under_a_real_pgd_is_at_most_clean():
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model = linear_pixel_model([[3, -1, 0], [0, 2, -1], [-1, 0, 2]])
    result = evaluate_accuracy(
        model, loader_of(images, labels), "cpu", {"pgd": PGD(model, 0.3, 0.1, 5)}
    )
    assert result["pgd"] <= result["clean"]


# ------------------------------------------------------------------------- faithfulness

# One 2x2 image, red channel r = [[1.0, 0.6], [0.2, 0.0]] (green, blue 0); model logits
# (sum r, 0) = (4 * mean r, 0), so p_0 = sigmoid(sum r) and the prediction is class 0
# (sum r = 1.8 > 0). Explanation of class 0: [[0.1, 0.9], [0.5, 0.0]] -> pixel ranking
# (flat index) 1, 2, 0, 3. Black baseline (0):
#   k = 25% (1 pixel, index 1, r = 0.6): comp -> sum r = 1.2, suff -> 0.6
#   k = 50% (2 pixels, 1 and 2, r = 0.6 + 0.2): comp -> 1.0, suff -> 0.8
RED = torch.tensor([[1.0, 0.6], [0.2, 0.0]])
MAP_CLASS_0 = torch.tensor([[0.1, 0.9], [0.5, 0.0]])
P = sigmoid(1.8)
COMP = {25: P - sigmoid(1.2), 50: P - sigmoid(1.0)}
SUFF = {25: P - sigmoid(0.6), 50: P - sigmoid(0.8)}


def red_image() -> torch.Tensor:
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = RED
    return image


RED_SUM_MODEL = [[4, 0, 0], [0, 0, 0]]


def test_erasure_scores_by_hand():
    model = linear_pixel_model(RED_SUM_MODEL).eval()
    comp, suff = erasure_scores(model, red_image(), MAP_CLASS_0[None], torch.tensor([0]), [25, 50])
    torch.testing.assert_close(comp[:, 0], torch.tensor([COMP[25], COMP[50]]))
    torch.testing.assert_close(suff[:, 0], torch.tensor([SUFF[25], SUFF[50]]))


def test_faithfulness_by_hand_explains_the_predicted_class():
    model = linear_pixel_model(RED_SUM_MODEL)
    # the map of class 1 ranks the pixels the other way round: using it would change the result
    explainer = FixedExplainer({0: MAP_CLASS_0, 1: 1 - MAP_CLASS_0})
    result = faithfulness(
        model, explainer, loader_of(red_image(), torch.tensor([1])), "cpu", ks=[25, 50]
    )
    assert explainer.targets == [[0]]
    assert result["comp"] == close(100 * (COMP[25] + COMP[50]) / 2)
    assert result["suff"] == close(100 * (SUFF[25] + SUFF[50]) / 2)
    assert result["comp_k25"] == close(100 * COMP[25])
    assert result["suff_k50"] == close(100 * SUFF[50])


def test_evaluation_scores_comp_and_suff_per_image_for_the_predicted_class():
    """evaluation's Comp/Suff: each image's mean over the k bins (probability units; x100 later),
    with its square for the per-image sd."""
    explainer = FixedExplainer({0: MAP_CLASS_0, 1: 1 - MAP_CLASS_0})
    scores = scores_of(linear_pixel_model(RED_SUM_MODEL), explainer, lambda x, y: x, red_image(),
                       torch.tensor([1]))
    assert explainer.targets == [[0], [0]]  # E(x) and E(x') of the predicted class
    comp, suff = (COMP[25] + COMP[50]) / 2, (SUFF[25] + SUFF[50]) / 2
    assert scores["comp"].tolist() == pytest.approx([comp]) and scores["comp"].dtype == torch.float64
    assert scores["suff"].tolist() == pytest.approx([suff])
    assert scores["comp_sq"].tolist() == pytest.approx([comp**2], rel=1e-5)
    assert scores["suff_sq"].tolist() == pytest.approx([suff**2], rel=1e-5)


def test_faithfulness_averages_over_images_and_ignores_the_batching():
    # second image: r = 0.5 everywhere, so p_0 = sigmoid(2); erasing 1 or 2 pixels leaves
    # sum r = 1.5 or 1.0 (comp) and 0.5 or 1.0 (suff), whatever the ranking.
    images = torch.cat([red_image(), torch.zeros(1, 3, 2, 2)])
    images[1, 0] = 0.5
    p = sigmoid(2.0)
    comp_2 = ((p - sigmoid(1.5)) + (p - sigmoid(1.0))) / 2
    suff_2 = ((p - sigmoid(0.5)) + (p - sigmoid(1.0))) / 2
    model = linear_pixel_model(RED_SUM_MODEL)
    explainer = FixedExplainer({0: MAP_CLASS_0})
    labels = torch.tensor([0, 0])
    expected_comp = 100 * ((COMP[25] + COMP[50]) / 2 + comp_2) / 2
    expected_suff = 100 * ((SUFF[25] + SUFF[50]) / 2 + suff_2) / 2
    for batch_size, forward_batch in [(1, 1024), (2, 1024), (2, 2)]:
        result = faithfulness(
            model, explainer, loader_of(images, labels, batch_size=batch_size), "cpu",
            ks=[25, 50], forward_batch=forward_batch,
        )
        assert result["comp"] == close(expected_comp)
        assert result["suff"] == close(expected_suff)


def test_faithfulness_breaks_ties_by_pixel_index():
    # a constant map ranks pixels 0, 1, 2, 3: k = 25% erases r = 1.0 (comp -> sum 0.8)
    model = linear_pixel_model(RED_SUM_MODEL)
    explainer = FixedExplainer({0: torch.full((2, 2), 0.5)})
    loader = loader_of(red_image(), torch.tensor([0]))
    result = faithfulness(model, explainer, loader, "cpu", ks=[25])
    assert result["comp"] == close(100 * (P - sigmoid(0.8)))
    assert result["suff"] == close(100 * (P - sigmoid(1.0)))


def test_faithfulness_upsamples_the_map_to_the_image():
    # a 1x2 map [high, low] over a 2x4 image: bilinear upsampling puts the highest values on
    # the left column, so k = 25% (2 pixels) erases column 0 (r = 1 in both rows; others 0)
    image = torch.zeros(1, 3, 2, 4)
    image[0, 0, :, 0] = 1.0
    model = linear_pixel_model([[8, 0, 0], [0, 0, 0]])  # logit 0 = 8 * mean r = sum r
    explainer = FixedExplainer({0: torch.tensor([[1.0, 0.0]])})
    result = faithfulness(model, explainer, loader_of(image, torch.tensor([0])), "cpu", ks=[25])
    assert result["comp"] == close(100 * (sigmoid(2.0) - sigmoid(0.0)))
    assert result["suff"] == close(0.0)


def test_blur_baseline_on_a_constant_image_changes_nothing():
    image = torch.full((1, 3, 8, 8), 0.3)  # blurring a constant image leaves it as it is
    model = linear_pixel_model([[4, -2, 1], [0, 0, 0]])
    explainer = FixedExplainer({0: torch.rand(4, 4), 1: torch.rand(4, 4)})
    result = faithfulness(
        model, explainer, loader_of(image, torch.tensor([0])), "cpu", ks=[10, 50], baseline="blur"
    )
    assert result["comp"] == close(0.0)
    assert result["suff"] == close(0.0)


def test_mean_colour_baseline_by_hand():
    """Erased pixels take the image's mean colour: red mean 0.45. k = 25% erases pixel 1 (0.6):
    comp -> sum r = 1.8 - 0.6 + 0.45 = 1.65; suff keeps it: 0.6 + 3 * 0.45 = 1.95 (> 1.8: a negative
    sufficiency, the prediction grows more confident on the kept evidence)."""
    model = linear_pixel_model(RED_SUM_MODEL).eval()
    comp, suff = erasure_scores(model, red_image(), MAP_CLASS_0[None], torch.tensor([0]), [25], "mean")
    torch.testing.assert_close(comp[:, 0], torch.tensor([P - sigmoid(1.65)]))
    torch.testing.assert_close(suff[:, 0], torch.tensor([P - sigmoid(1.95)]))


@pytest.mark.parametrize("baseline", ["black", "blur", "mean"])
def test_erasure_scores_equal_an_independent_per_pixel_loop(baseline):
    """ERASER's definitions computed the slow way: for each image and k, sort the upsampled map's
    pixels (ties to the lower index), replace the top k% (comp) or all others (suff) one by one."""
    from egat.metrics.faithfulness import baseline_fill

    from tests.helpers import tiny_classifier

    model = tiny_classifier(num_classes=4).eval()
    torch.manual_seed(0)
    images, maps = torch.rand(3, 3, 8, 8), torch.rand(3, 4, 4)
    target = model(images).argmax(1)
    ks = [10, 50]
    comp, suff = erasure_scores(model, images, maps, target, ks, baseline)
    fill = baseline_fill(images, baseline)
    up = torch.nn.functional.interpolate(maps[:, None], size=(8, 8), mode="bilinear")[:, 0]
    for i in range(3):
        p = model(images[i : i + 1]).softmax(1)[0, target[i]]
        order = sorted(range(64), key=lambda j: (-float(up[i].flatten()[j]), j))
        for row, k in enumerate(ks):
            top = set(order[: max(1, int(k / 100 * 64 + 0.5))])
            erased, kept = images[i].clone(), images[i].clone()
            for j in range(64):
                y, x = divmod(j, 8)
                if j in top:
                    erased[:, y, x] = fill[i, :, y, x]
                else:
                    kept[:, y, x] = fill[i, :, y, x]
            with torch.no_grad():
                c = p - model(erased[None]).softmax(1)[0, target[i]]
                s = p - model(kept[None]).softmax(1)[0, target[i]]
            assert float(comp[row, i]) == pytest.approx(float(c), abs=1e-6)
            assert float(suff[row, i]) == pytest.approx(float(s), abs=1e-6)


def test_faithfulness_restores_the_model_mode():
    model = linear_pixel_model(RED_SUM_MODEL).train()
    faithfulness(model, FixedExplainer({0: MAP_CLASS_0}), loader_of(red_image(), torch.tensor([0])),
                 "cpu", ks=[25])
    assert model.training


def test_descending_ranks_are_stable():
    scores = torch.tensor([[0.2, 0.9, 0.2, 0.5]])
    assert descending_ranks(scores).tolist() == [[2, 0, 3, 1]]


def test_object_erased_accuracy_by_hand():
    # 2x2 images labelled red, the object the pixel (0, 0), red 1 there. Image 0 also shows green
    # 0.5 at (1, 1): erased to black, green (0.5) beats red (0), wrong; to its mean colour
    # (0.25, 0.125, 0), red 0.25 against green 0.625, wrong too. Image 1 shows red 0.5 at (1, 1):
    # red is left after either erasure, right.
    images = torch.zeros(2, 3, 2, 2)
    images[:, 0, 0, 0] = 1.0
    images[0, 1, 1, 1] = 0.5
    images[1, 0, 1, 1] = 0.5
    masks = torch.zeros(2, 1, 2, 2)
    masks[:, 0, 0, 0] = 1.0
    labels = torch.tensor([0, 0])
    model = linear_pixel_model(RGB_MODEL).eval()
    assert correct(model, images, labels).tolist() == [True, True]
    assert object_erased_correct(model, images, labels, masks).tolist() == [False, True]
    assert object_erased_correct(model, images, labels, masks, "mean").tolist() == [False, True]


# ---------------------------------------------------------------------------- stability

# Maps a = [1, 2, 3, 4], b = [1, 3, 2, 4] (no ties): rank differences d = (0, 1, 1, 0),
# rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60 = 0.8. Top 50% (2 entries): a -> {3, 2},
# b -> {3, 1}: they share one of two -> 0.5.
MAP_A = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
MAP_B = torch.tensor([[1.0, 3.0, 2.0, 4.0]])


def test_spearman_by_hand():
    assert spearman_rows(MAP_A, MAP_B).tolist() == pytest.approx([0.8])
    # ties take average ranks: [0, 0, 1, 2] -> ranks (1.5, 1.5, 3, 4), perfectly monotone with
    # [5, 5, 6, 9]; a constant map is undefined (NaN)
    ties = torch.tensor([[0.0, 0.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    rho = spearman_rows(ties, torch.tensor([[5.0, 5.0, 6.0, 9.0], [1.0, 2.0, 3.0, 4.0]]))
    assert rho[0] == pytest.approx(1.0) and rho[1].isnan()


def test_top_intersection_by_hand():
    assert top_intersection(MAP_A, MAP_B, 0.5).tolist() == [0.5]
    assert top_intersection(MAP_A, MAP_B, 0.25).tolist() == [1.0]  # both top-1: index 3
    assert top_intersection(MAP_A, MAP_A.flip(1), 0.5).tolist() == [0.0]


def test_explanation_stability_by_hand():
    # images are 2x2; the explainer returns the red channel, so E(x) = r. The "attack" swaps the
    # two middle pixels of the first image (E(x) = A, E(x') = B) and leaves the second image alone.
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0] = MAP_A.view(2, 2) / 4
    images[1, 0] = torch.tensor([[0.1, 0.4], [0.3, 0.2]])

    def swap_middle(x, y):
        x = x.clone()
        x[0, 0] = MAP_B.view(2, 2) / 4
        return x

    model = linear_pixel_model(RED_SUM_MODEL)
    scores = scores_of(model, RedChannelExplainer(), swap_middle, images, torch.tensor([0, 0]))
    assert scores["spearman"].tolist() == pytest.approx([0.8, 1.0])  # both defined: mean 0.9
    assert scores["top_intersection"].tolist() == pytest.approx([0.5, 1.0])


def test_explanation_stability_explains_the_predicted_class_on_both_images():
    # the model predicts class 0 (sum r > 0); the labels say 1
    images = torch.rand(2, 3, 2, 2)
    explainer = FixedExplainer({0: MAP_A.view(2, 2), 1: MAP_B.view(2, 2)})
    scores = scores_of(linear_pixel_model(RED_SUM_MODEL), explainer, lambda x, y: x, images,
                       torch.tensor([1, 1]), top=0.1)
    assert explainer.targets == [[0, 0], [0, 0]]
    assert scores["spearman"].tolist() == pytest.approx([1.0, 1.0])
    assert scores["top_intersection"].tolist() == [1.0, 1.0]


def test_costly_scores_attack_every_image_but_count_a_clean_mistake_as_not_robust():
    images, labels = coloured_images()  # the blue image (index 2, label 0) is misclassified
    seen = []

    def to_label_colour(x, y):  # makes every image correct: the blue one too
        seen.append(len(x))
        out = torch.zeros_like(x)
        out[torch.arange(len(x)), y] = 1.0
        return out

    scores = scores_of(linear_pixel_model(RGB_MODEL), RedChannelExplainer(), to_label_colour,
                       images, labels)
    assert seen == [4]  # stability needs E(x') of every image
    assert scores["aacc"].tolist() == [True, True, False, True]


def test_constant_maps_are_left_out_of_the_spearman_mean():
    maps = torch.rand(2, 2, 2)
    maps[1] = 0.5  # a constant map: Spearman is undefined for that image
    scores = stability_scores(maps, maps.clone(), 0.1)
    assert scores["spearman"].tolist() == pytest.approx([1.0])  # one of the two images scored
    assert scores["top_intersection"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------- alignment


def test_alignment_scores_by_hand():
    # 2x2 maps on 2x2 masks (no resampling). Image 0: map max at (0, 1), inside the mask
    # {(0, 0), (0, 1)}; mass inside = (0.2 + 1.0) / (0.2 + 1.0 + 0.4 + 0.4) = 0.6.
    # Image 1: max at (1, 1), mask {(0, 0)}: a miss; mass 0.5 / (0.5 + 1.0) = 1/3.
    # Image 2: an all-zero map: a miss with mass 0.
    maps = torch.tensor(
        [[[0.2, 1.0], [0.4, 0.4]], [[0.5, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    )
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[1, 1], [1, 1.0]]])
    hits, mass = alignment_scores(maps, masks[:, None])
    assert hits.tolist() == [True, False, False]
    torch.testing.assert_close(mass, torch.tensor([0.6, 1 / 3, 0.0]))


def test_alignment_upsamples_bilinearly():
    # a 2x2 map [[1, 0], [1, 0]] on a 4x4 image: bilinear (align_corners=False) rows read
    # (1, 0.75, 0.25, 0), so a mask on the left two columns holds 1.75 / 2 = 0.875 of the mass
    # and the maximum (column 0) is inside it.
    maps = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    hits, mass = alignment_scores(maps, mask)
    assert hits.tolist() == [True]
    assert mass.item() == pytest.approx(0.875)


def test_explanation_alignment_explains_the_true_class():
    images = torch.rand(2, 3, 4, 4)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, ..., :2] = 1.0  # image 0: left half, hit and 0.875 (see above)
    masks[1, ..., 2:] = 1.0  # image 1: right half, miss and 0.125
    explainer = FixedExplainer({0: MAP_CLASS_0, 1: torch.tensor([[1.0, 0.0], [1.0, 0.0]])})
    scores = scores_of(linear_pixel_model(RED_SUM_MODEL), explainer, lambda x, y: x, images,
                       torch.tensor([1, 1]), masks)
    # the predicted class (0) on x and x' for Comp/Suff and stability, then the true class
    assert explainer.targets == [[0, 0], [0, 0], [1, 1]]
    assert scores["pointing_game"].tolist() == [True, False]
    assert scores["mass_in_mask"].tolist() == pytest.approx([0.875, 0.125])  # mean 0.5


def test_no_masks_no_alignment_scores():
    scores = scores_of(linear_pixel_model(RED_SUM_MODEL), RedChannelExplainer(), lambda x, y: x,
                       torch.rand(1, 3, 2, 2), torch.tensor([0]))
    assert "pointing_game" not in scores and "mass_in_mask" not in scores
    assert {"aacc", "comp", "suff", "spearman", "top_intersection"} <= set(scores)


# ---------------------------------------------------------------------------------- cue


def test_cue_scores_by_hand():
    # cue = label for images 0, 1 (right, wrong); images 2-4 have a misleading cue: 2 follows it,
    # 3 is right, 4 is neither
    labels = torch.tensor([0, 1, 0, 1, 2])
    cue = torch.tensor([0, 1, 2, 0, 1])
    pred = torch.tensor([0, 2, 2, 1, 0])
    scores = cue_scores(pred, labels, cue)
    assert scores["cacc_cue_match"].tolist() == [True, False]
    assert scores["cacc_cue_mismatch"].tolist() == [False, True, False]
    assert scores["cue_follow"].tolist() == [True, False, False]


def test_validation_cue_metrics_by_hand_and_the_training_rng_untouched():
    """The Trainer's cue validation metrics on a linear pixel model, pixels picked so that each
    image's prediction is known: cAcc where the cue misleads, and aAcc on the cue-free renders."""
    from egat.train.trainer import cue_mismatch_accuracy, validation_metrics

    model = linear_pixel_model([[1, 0, 0], [0, 1, 0], [0, 0, 1]])  # logit c = mean of channel c
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.1, 0.1],
                            [0.1, 0.1, 0.9]])
    images = colours[:, :, None, None].expand(5, 3, 4, 4).clone()  # predictions 0, 1, 2, 0, 2
    labels, cue = torch.tensor([0, 1, 0, 0, 1]), torch.tensor([0, 2, 2, 1, 1])
    batches = loader_of(images, labels)
    for start, batch in zip(range(0, 5, 2), batches):
        batch["cue"] = cue[start : start + 2]
    # misleading cue on images 1, 2, 3 (cue != label); right there: 1 (pred 1), 3 (pred 0)
    assert cue_mismatch_accuracy(model, batches, "cpu") == pytest.approx(200 / 3)
    matching = [{**batches[0], "cue": batches[0]["label"]}]
    assert math.isnan(cue_mismatch_accuracy(model, matching, "cpu"))  # no misleading cue: NaN, not 0
    # cue-free renders: image 0 as observed, the others grey (logits tie: argmax 0). Under eps
    # 0.3, image 0's margin 0.8 > 2 * 0.3 holds; a grey image flips away from class 0.
    grey = images.clone()
    grey[1:] = 0.5
    cue_free = loader_of(grey, labels)
    params = params_from_dict({"train": {"val_metrics": ["cue_mismatch", "cue_free_aacc"]},
                               "eval": {"attack": {"eps": 0.3, "alpha": 0.1, "steps": 3}}})
    torch.manual_seed(7)
    out = validation_metrics(model, params, batches, "cpu", cue_free)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)  # validation drew nothing from the training stream
    assert out["val/acc"] == pytest.approx(60.0)  # images 0, 1, 3 right
    assert out["val/cue_mismatch_acc"] == pytest.approx(200 / 3)
    assert out["val/cue_free_acc"] == pytest.approx(60.0)  # image 0, grey images 2, 3 (label 0)
    assert out["val/cue_free_aacc"] == pytest.approx(20.0)  # image 0 only
    assert "val/aacc" not in out


# ----------------------------------------------------------------- evaluation and catalog


@pytest.mark.parametrize(("domain", "expected"), [
    ({"n": 50, "n_cue_mismatch": 20}, 30),
    ({"n": 50, "n_cue_mismatch": 0}, 50),  # every cue matches: all 50, not 0
    ({"n": 50, "n_cue_mismatch": 50}, 0),
    ({"n": 50}, None),  # a run without cue classes counts no cue-matching images
])
def test_cue_match_image_count(domain, expected):
    cue_match = next(m for m in METRICS if m.name == "cacc_cue_match")
    assert image_count(cue_match, domain) == expected


def test_evaluate_domain_writes_the_catalog_metrics_and_their_counts():
    """One domain of tiny images with masks, cues and cue-free renders: every metric of
    egat/metrics/catalog.py, in its unit, plus the image counts and Comp/Suff's sd."""
    from tests.helpers import tiny_classifier

    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    batches = loader_of(images, labels, (torch.rand(6, 1, 8, 8) > 0.5).float(), batch_size=4)
    for start, batch in zip((0, 4), batches):
        batch["cue"] = torch.tensor([0, 2, 2, 1, 1, 0])[start : start + len(batch["label"])]
        batch["index"] = torch.arange(start, start + len(batch["label"]))
    cue_free = [{"image": b["image"].flip(-1)} for b in batches]
    params = params_from_dict({"eval": {"attack": {"steps": 1}, "faithfulness": {"ks": [10, 50]}}})
    out = evaluate_domain(tiny_classifier(), params, batches, "cpu", cue_free, torch.tensor([1, 2, 5]))
    assert set(out) == {*METRIC_NAMES, "comp_sd", "suff_sd", "n", "n_costly", "n_cue_mismatch"}
    assert (out["n"], out["n_costly"], out["n_cue_mismatch"]) == (6, 3, 3)  # cue != label: 1, 3, 5
    # percentages of 6 images, of the 3 costly ones, of the 3 whose cue misleads
    for name, count in (("cacc", 6), ("object_erased_cacc", 6), ("cue_free_cacc", 6),
                        ("aacc", 3), ("cue_follow", 3), ("cacc_cue_match", 3)):
        assert out[name] * count / 100 == pytest.approx(round(out[name] * count / 100))
    assert 0 <= out["pointing_game"] <= 1 and -1 <= out["spearman"] <= 1


class _Split(torch.utils.data.Dataset):
    """The two attributes :func:`costly_ids` reads from a test split: labels and image indices."""

    def __init__(self, labels: list[int]):
        self.labels = torch.tensor(labels)
        self.indices = torch.arange(100, 100 + len(labels))  # not 0..n-1: ids, not positions

    def __len__(self):
        return len(self.labels)


@pytest.mark.parametrize("in_domain, ood, expected", [
    (True, 4, 6), (False, 4, 4), (False, None, 6), (False, 0, 12),
])
def test_costly_ids_take_a_stratified_subset_sized_by_domain_group(in_domain, ood, expected):
    """eval.costly_examples in domain, eval.ood_costly_examples (null: the same, 0: all) out of
    domain; every class keeps its share."""
    from egat.evaluation import costly_ids

    split = _Split([0, 1, 2, 3] * 3)
    params = params_from_dict({"eval": {"costly_examples": 6, "ood_costly_examples": ood}})
    loader = torch.utils.data.DataLoader(split)
    chosen = costly_ids(loader, params, in_domain)
    assert len(chosen) == len(set(chosen.tolist())) == expected
    labels = split.labels[chosen - 100]
    counts = torch.bincount(labels, minlength=4)
    assert int(counts.max() - counts.min()) <= 1 and (expected < 4 or bool((counts > 0).all()))
    assert torch.equal(chosen, costly_ids(loader, params, in_domain))  # seeded
