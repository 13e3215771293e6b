"""The seam between the textbook and the fast engine: the textbook runs alone (a tree without
nanocolor/fast trains and colorizes, with the engine's numbers), and no module of the package
imports another in a circle."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import REPO, script_env

PACKAGE = REPO / "nanocolor"

# One training step (its loss, gradients and BatchNorm statistics) and one colorized photo (after the step), written to the .npz named by argv[1]: run once by a
# tree without nanocolor/fast, once by the full package.
STEP_AND_COLORIZE = """
import sys
if sys.argv[2] == "without-fast":  # also where an installed copy of the package has it
    sys.modules["nanocolor.fast"] = None
import numpy as np
from nanocolor import engine
from nanocolor.infer import colorize_array
from nanocolor.loss import MSELoss
from nanocolor.model import ColorNet
from nanocolor.optim import Adam
from nanocolor.trainer import train_step

rng = np.random.default_rng(0)
lightness = rng.uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
ab_true = rng.uniform(-0.5, 0.5, (4, 16, 16, 2)).astype(np.float32)
model = ColorNet((16, 32, 32), seed=3)
net = engine.network(model)
loss = train_step(net, MSELoss(), Adam(model.param_layers, lr=1e-3, map_tasks=engine.map_tasks()), lightness, ab_true)
grads = {f"grad{i}.{name}": g for i, layer in enumerate(model.param_layers) for name, g in layer.grads.items()}
stats = {name: a for name, a in model.state_arrays().items() if "running" in name}
photo = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
np.savez(sys.argv[1], loss=float(loss), colorized=colorize_array(model.eval(), photo, work_size=32),
         engine=type(net).__name__, **grads, **stats)
"""


def run_step(tree: Path, out: Path, without_fast: bool = False) -> dict:
    env = script_env()
    env["PYTHONPATH"] = str(tree)
    args = [str(out), "without-fast" if without_fast else "with-fast"]
    result = subprocess.run([sys.executable, "-c", STEP_AND_COLORIZE, *args], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(np.load(out))


def test_the_textbook_alone_trains_and_colorizes_with_the_engines_numbers(tmp_path):
    alone = tmp_path / "textbook"
    shutil.copytree(PACKAGE, alone / "nanocolor", ignore=shutil.ignore_patterns("fast", "__pycache__"))
    assert not (alone / "nanocolor" / "fast").exists()
    textbook = run_step(alone, tmp_path / "textbook.npz", without_fast=True)
    engine = run_step(REPO, tmp_path / "engine.npz")
    assert str(textbook.pop("engine")) == "ColorNet" and str(engine.pop("engine")) == "Network"
    assert textbook.keys() == engine.keys()
    np.testing.assert_allclose(textbook.pop("loss"), engine.pop("loss"), rtol=1e-5)
    np.testing.assert_allclose(textbook.pop("colorized"), engine.pop("colorized"), atol=1e-4)
    assert len(textbook) > 20
    for name in textbook:  # every gradient of the step, and BatchNorm's running statistics after it
        scale = float(np.abs(textbook[name]).max())
        np.testing.assert_allclose(engine[name], textbook[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def imports_of(path: Path) -> set[str]:
    """The nanocolor modules (dotted names) that the module at `path` imports, at any depth of its code."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if path.name == "__init__.py":
        parts = parts[:-1]
    module = ".".join(parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nanocolor")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("nanocolor"):
                # `from . import fast` imports the module nanocolor.fast; `from .x import y` the module x
                names = [f"{base}.{a.name}" for a in node.names]
                found |= {n for n in names if module_path(n) is not None} or {base}
    found.discard(module)
    return {m for m in found if module_path(m) is not None}


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = imports_of(path)
    return graph


def test_no_module_imports_another_in_a_circle():
    """Every import, even inside a function, is an edge (`from . import x` reads the sibling x,
    `from . import f` the package's __init__)."""
    graph = import_graph()
    assert "nanocolor.fast.network" in graph["nanocolor.fast"]  # the graph sees relative imports
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            assert state.get(other) != "open", "import circle: " + " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_textbook_imports_nothing_of_the_engine():
    graph = import_graph()
    for textbook in ("nanocolor.layers", "nanocolor.model", "nanocolor.loss", "nanocolor.optim"):
        reach, todo = set(), [textbook]
        while todo:  # everything it imports, directly or not
            for other in graph[todo.pop()]:
                if other not in reach:
                    reach.add(other)
                    todo.append(other)
        assert not {m for m in reach if m.startswith("nanocolor.fast") or m == "nanocolor.engine"}, textbook
