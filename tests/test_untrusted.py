"""Untrusted files and exposed services: checkpoint loads refuse pickled code, and every server
command the docs show binds 127.0.0.1 (archives: tests/test_download.py; pickles: test_data.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from egat import io
from egat.errors import EgatError
from egat.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("egat", "pipelines", "tune", "benchmarks", "scripts", "tests")


def unsafe_loads(source: str) -> list[int]:
    """Lines of ``torch.load(...)`` calls without ``weights_only=True``, and of ``np.load`` /
    ``numpy.load`` calls with ``allow_pickle=True``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and node.func.attr == "load"):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        flag = kwargs.get("weights_only") if owner.id == "torch" else kwargs.get("allow_pickle")
        if owner.id == "torch" and not (isinstance(flag, ast.Constant) and flag.value is True):
            bad.append(node.lineno)
        if owner.id in ("np", "numpy") and isinstance(flag, ast.Constant) and flag.value is True:
            bad.append(node.lineno)
    return bad


@pytest.mark.parametrize("snippet, lines", [
    ("torch.load(p)", [1]),
    ("torch.load(p, weights_only=False)", [1]),
    ("x = 1\ntorch.load(p, map_location='cpu', weights_only=flag)", [2]),
    ("np.load(p, allow_pickle=True)", [1]),
    ("torch.load(p, weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False)", []),
])
def test_the_scanner_finds_unsafe_loads(snippet, lines):
    assert unsafe_loads(snippet) == lines


def test_every_torch_load_in_the_project_is_weights_only():
    offenders = []
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n in unsafe_loads(path.read_text())]
    assert offenders == [], f"torch.load without weights_only=True (or np.load with pickles): {offenders}"


class _Payload:
    """Unpickling it would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_and_state_dict_loads_refuse_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload(marker)}, path)
    # Naming the refused globals reads the pickle's opcodes only; nothing of it runs.
    with pytest.raises(EgatError, match=r"evil.pt: refused: it pickles objects of type io.open"):
        io.torch_load(path)
    with pytest.raises(EgatError, match=r"evil.pt: refused: .*; expected a state_dict \(model.pretrained\)"):
        build_model("small_resnet", 3, pretrained=str(path))
    assert not marker.exists()


SERVERS = re.compile(r"\b(mlflow (?:ui|server)|tensorboard|http\.server|jupyter (?:lab|notebook)|"
                     r"ray dashboard|streamlit run|gradio)\b")


def doc_commands(text: str) -> list[str]:
    """The shell lines of fenced code blocks and the inline code spans of a Markdown text."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", outside)


def exposed_servers(text: str) -> list[str]:
    """Server commands of a Markdown text that do not bind 127.0.0.1."""
    servers = [cmd for cmd in doc_commands(text)
               if SERVERS.search(cmd) and len(cmd.split()) > 2]  # a bare name in prose is no command
    return [cmd for cmd in servers if not re.search(r"--(host|bind)[ =]127\.0\.0\.1\b", cmd)]


@pytest.mark.parametrize("text, exposed", [
    ("```bash\nmlflow ui --port 5000\n```", ["mlflow ui --port 5000"]),
    ("run `mlflow server --host 0.0.0.0 --port 5000` here", ["mlflow server --host 0.0.0.0 --port 5000"]),
    ("`python -m http.server 8000`", ["python -m http.server 8000"]),
    ("```\nmlflow ui --host 127.0.0.1 --port 5000\n```\nuse an `mlflow server`", []),
])
def test_the_docs_scan_finds_servers_that_bind_elsewhere(text, exposed):
    assert exposed_servers(text) == exposed


def test_every_server_command_in_the_docs_binds_localhost():
    readme = (ROOT / "README.md").read_text()
    assert "mlflow ui --backend-store-uri" in readme, "the README shows how to start the MLflow UI"
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert exposed_servers(doc.read_text()) == [], f"{doc.name}: servers not bound to 127.0.0.1"


def test_server_commands_in_error_messages_bind_localhost():
    for path in sorted((ROOT / "egat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SERVERS.search(node.value):
                if "--" in node.value:
                    assert "--host 127.0.0.1" in node.value, f"{path}: {node.value}"
