"""Property test: any params file, valid or not, either validates or fails with the one-line
ParamsError the CLI prints; never another exception (a traceback)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egat.build import load_params
from egat.config import Params
from egat.errors import ParamsError

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def key_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


PATHS = key_paths(DEFAULTS)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**3), 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.from_regex(r"-?\d{1,3} ?/ ?-?\d{1,3}", fullmatch=True),  # fractions such as 8/255, 1/0
    st.sampled_from(["egat", "erm", "pgd", "grayscale", "auto", "ray", "folder", "small_resnet",
                     "asha", "optuna", "error", "skip", "http://x", "s3://b/p"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(PATHS) | st.lists(st.text(max_size=6), min_size=1, max_size=3).map(tuple)
edits = st.lists(st.tuples(keys, st.one_of(values, st.just("<delete>"))), max_size=4)


def edited(edits_: list) -> dict:
    raw = copy.deepcopy(DEFAULTS)
    for path, value in edits_:
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value == "<delete>":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return raw


def check(path: Path, overrides: list[str] = ()) -> bool:
    """True when the params validate, False for a one-line ParamsError; anything else propagates."""
    try:
        params = load_params(path, list(overrides))
    except ParamsError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message and "Traceback" not in message, message
        return False
    assert isinstance(params, Params)
    return True


# derandomize: the same examples on every run (a fixed seed); ~10 s on 2 busy cores.
SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_generated_params_files_validate_or_fail_in_one_line(tmp_path):
    outcomes = []

    @SETTINGS
    @given(edits)
    def one_file(edits_):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(edited(edits_), allow_unicode=True))
        outcomes.append(check(path))

    one_file()
    assert True in outcomes and False in outcomes  # both kinds were generated


def test_generated_overrides_and_raw_text_validate_or_fail_in_one_line(tmp_path):
    outcomes = []
    dotted = st.sampled_from([".".join(map(str, p)) for p in PATHS]) | st.text(max_size=8)

    @SETTINGS
    @given(st.lists(st.tuples(dotted, st.text(max_size=12)), max_size=3), st.text(max_size=40))
    def one_run(overrides, text):
        good = tmp_path / "params.yaml"
        good.write_text(yaml.safe_dump(DEFAULTS))
        outcomes.append(check(good, [f"{key}={value}" for key, value in overrides]))
        junk = tmp_path / "junk.yaml"
        junk.write_text(text)
        outcomes.append(check(junk))

    one_run()
    assert True in outcomes and False in outcomes
