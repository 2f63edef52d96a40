"""The layering rules of the package (README "Layout"), checked on the source: one home for each concern.

* no import cycle, counting imports inside functions too;
* ``parallel/`` imports nothing from ``train/``; ``data/`` nothing from ``teachers/`` or ``preprocess/``;
  ``model/``, ``losses/`` and ``kernels/`` nothing from ``data``, ``parallel``, ``train`` or the entry points;
* only ``config/paths.py`` expands or resolves paths; only ``train/checkpoint.py`` names the checkpoint marker;
* every console script in pyproject.toml points into ``perceptio_dist/cli/``, and only ``cli/`` parses command
  lines (argparse): library code takes typed arguments;
* ``eval/`` imports nothing from the entry points;
* the core never imports ``experiments/`` (they plug in through perceptio_dist/registry.py; only ``cli/``, the
  entry points, may name them);
* config fields are declared beside their component, in its ``config.py`` (or ``<job>_config.py``), and the
  configuration engine (``config/``) imports no component: only ``config/training.py`` assembles them.

Each rule is a function of the sources, also run on a deliberate violation, so a rule that stops seeing anything
fails here.
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict

from .conftest import ROOT

PACKAGE = ROOT / "perceptio_dist"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, tree) in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def test_no_import_cycles():
    graph, state, cycles = _import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


FLOORS = {
    "perceptio_dist.parallel": ("perceptio_dist.train",),
    "perceptio_dist.data": ("perceptio_dist.teachers", "perceptio_dist.preprocess", "perceptio_dist.train",
                            "perceptio_dist.parallel"),
    "perceptio_dist.model": ("perceptio_dist.data", "perceptio_dist.parallel", "perceptio_dist.train",
                             "perceptio_dist.losses", "perceptio_dist.cli"),
    "perceptio_dist.losses": ("perceptio_dist.data", "perceptio_dist.parallel", "perceptio_dist.train",
                              "perceptio_dist.cli"),
    "perceptio_dist.kernels": ("perceptio_dist.losses", "perceptio_dist.train"),
    "perceptio_dist.eval": ("perceptio_dist.cli",),
}


def broken_floors(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]] = FLOORS) -> list[tuple[str, str]]:
    return [(module, target) for module, targets in graph.items() for target in targets
            for floor, forbidden in rules.items()
            if (module == floor or module.startswith(floor + ".")) and target.startswith(forbidden)]


def test_floors_are_kept():
    assert not broken_floors(_import_graph())
    # A deliberate violation: evaluation reaching into the command line.
    assert broken_floors({"perceptio_dist.eval.run": {"perceptio_dist.cli.eval"}}) == [
        ("perceptio_dist.eval.run", "perceptio_dist.cli.eval")]


def parses_command_lines(tree: ast.Module) -> bool:
    """Whether a module imports argparse (anywhere, also inside a function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "argparse":
            return True
    return False


def test_only_the_entry_points_parse_command_lines():
    outside = [name for name, (_, tree) in _modules().items()
               if parses_command_lines(tree) and not name.startswith("perceptio_dist.cli")]
    assert not outside, outside
    assert parses_command_lines(ast.parse("def run():\n    from argparse import Namespace\n"))
    assert not parses_command_lines(ast.parse("import dataclasses\n"))


def test_one_home_for_paths_and_the_checkpoint_format():
    for path in PACKAGE.rglob("*.py"):
        text, rel = path.read_text(), path.relative_to(ROOT).as_posix()
        if rel != "perceptio_dist/config/paths.py":
            assert "expandvars" not in text and "expanduser" not in text and "REPO_ROOT" not in text, rel
        if rel != "perceptio_dist/train/checkpoint.py":
            assert "COMPLETE.json" not in text, rel


def test_console_scripts_live_in_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(target.startswith("perceptio_dist.cli.") for target in scripts.values()), scripts
    for target in scripts.values():
        module, function = target.split(":")
        assert f"def {function}(" in (ROOT / (module.replace(".", "/") + ".py")).read_text(), target


def declares_config_fields(tree: ast.Module) -> bool:
    """Whether a module declares config fields (calls doc_field or path_field)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
               and node.func.id in ("doc_field", "path_field") for node in ast.walk(tree))


def misplaced_config_modules(modules: dict[str, ast.Module]) -> list[str]:
    """Modules that declare config fields but are not a component's config module."""
    return sorted(name for name, tree in modules.items() if declares_config_fields(tree)
                  and not name.rsplit(".", 1)[-1].endswith("config")
                  and name not in ("perceptio_dist.config.fields", "perceptio_dist.config.training",
                                   "perceptio_dist.config.extensions"))


def engine_reaching_components(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from the configuration engine into any component (config/training.py is the one assembler; the
    registry, which finds the experiments that add fields, is no component)."""
    engine = "perceptio_dist.config"
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if (module == engine or module.startswith(engine + ".")) and module != f"{engine}.training"
                  and not (target == engine or target.startswith(engine + ".") or target == "perceptio_dist.registry"))


def test_configs_live_beside_their_components():
    modules = {name: tree for name, (_, tree) in _modules().items()}
    assert not misplaced_config_modules(modules)
    assert {"perceptio_dist.model.config", "perceptio_dist.data.config", "perceptio_dist.parallel.config"} <= {
        name for name, tree in modules.items() if declares_config_fields(tree)}
    # A deliberate violation: a field declared inside the trainer.
    planted = ast.parse("x: int = doc_field('A knob.', 1)\n")
    assert misplaced_config_modules({"perceptio_dist.train.trainer": planted}) == ["perceptio_dist.train.trainer"]


def test_the_config_engine_knows_no_component():
    assert not engine_reaching_components(_import_graph())
    # A deliberate violation: the path module reading the model's config.
    assert engine_reaching_components({"perceptio_dist.config.paths": {"perceptio_dist.model.config"}}) == [
        ("perceptio_dist.config.paths", "perceptio_dist.model.config")]


def core_importing_experiments(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    experiments = "perceptio_dist.experiments"
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if target.startswith(experiments) and not module.startswith((experiments, "perceptio_dist.cli")))


def test_the_core_never_imports_an_experiment():
    graph = _import_graph()
    assert not core_importing_experiments(graph)
    assert any(t.startswith("perceptio_dist.experiments") for t in graph["perceptio_dist.cli.demo"])  # it sees them
    # A deliberate violation: the evaluation's metrics importing the toy world's marker step.
    assert core_importing_experiments({"perceptio_dist.eval.metrics": {"perceptio_dist.experiments.toy.marker_step"}}
                                      ) == [("perceptio_dist.eval.metrics", "perceptio_dist.experiments.toy.marker_step")]
