"""The package's shape: no import cycle, its own modules imported at the top of a file, short functions, thin
commands, and the convert settings' precedence rule."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dpe_export.errors import UsageError
from dpe_export.export.settings import ConvertFlags, resolve_settings

PACKAGE = Path(__file__).resolve().parents[1] / "dpe_export"
MAX_FUNCTION_LINES = 80
MAX_COMMAND_LINES = 40


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _own_imports(name: str, node: ast.AST, modules) -> list[str]:
    """The package modules an import statement loads (the package uses absolute imports only)."""
    found = []
    if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        assert not node.level, f"{name}:{node.lineno}: relative import"
        found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if m in modules and m.startswith("dpe_export")]


def _graph(modules) -> dict[str, set[str]]:
    graph = {}
    for name, tree in modules.items():
        deps = set()
        for node in tree.body:  # module level: what importing this module runs
            for mod in _own_imports(name, node, modules):
                parts = mod.split(".")
                # importing a.b.c runs package a.b first, unless this module is inside a.b (then it already runs)
                deps.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                            if not name.startswith(p + "."))
        deps.discard(name)
        deps.discard("dpe_export")  # the root package imports nothing of its own
        graph[name] = {d for d in deps if d in modules}
    return graph


def test_no_import_cycle_among_the_package_modules():
    graph = _graph(_modules())
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_task_modules_import_neither_the_registry_nor_what_reads_it():
    """The registry imports the task modules, and run, results, plots, the card and the CLI ask the registry about
    any task: so nothing a task module loads may load one of those (or the registry could not see every task)."""
    graph = _graph(_modules())
    readers = {f"dpe_export.evaluation.{m}" for m in ("registry", "run", "results", "plots")} | {
        "dpe_export.export.card", "dpe_export.cli"}

    def closure(name, seen):
        for dep in graph[name]:
            if dep not in seen:
                seen.add(dep)
                closure(dep, seen)
        return seen

    tasks = [n for n in graph if n == "dpe_export.evaluation.tasks" or n.startswith("dpe_export.evaluation.tasks.")]
    assert "dpe_export.evaluation.tasks.base" in tasks
    bad = {n: sorted(closure(n, set()) & readers) for n in tasks}
    assert not any(bad.values()), {n: b for n, b in bad.items() if b}


def test_setup_cfg_installs_every_package():
    import configparser

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)


def test_the_package_imports_its_own_modules_at_the_top_of_a_file():
    modules = _modules()
    late = []
    for name, tree in modules.items():
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and _own_imports(name, node, modules):
                late.append(f"{name}:{node.lineno}")
    assert not late, f"imports of dpe_export modules inside functions: {late}"


@pytest.mark.parametrize("package", ["dpe_export.evaluation", "dpe_export.sources", "dpe_export.cli"])
def test_every_public_name_a_package_declares_is_there(package):
    import importlib

    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, missing


def test_functions_are_short():
    long = []
    for name, tree in _modules().items():
        source = (PACKAGE.parent / Path(*name.split("."))).with_suffix(".py")
        lines = source.read_text().splitlines() if source.exists() else []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                first = lines[node.lineno - 1] if lines else ""
                if n > MAX_FUNCTION_LINES and "# long:" not in first:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a '# long:' reason: {long}"


def test_commands_are_thin():
    tree = _modules()["dpe_export.cli.commands"]
    fat = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in tree.body
           if isinstance(n, ast.FunctionDef) and n.name.endswith("_command")
           and n.end_lineno - n.lineno + 1 > MAX_COMMAND_LINES]
    assert not fat, fat


# ----------------------------------------------------------------------------------------------------------
# convert's settings: flag, then calibration, then preset
# ----------------------------------------------------------------------------------------------------------


class _Preset:
    local_window_size, scale_factors, dimension_groups_range, target_length = 1024, (2, 4), (0, 32, 64), 65536


class _Calibration:
    window, target_length, pretrain_length = 512, 32768, 8192
    dimension_groups_range, chosen, top_k = (0, 16, 48, 64), (1, 8, 32), None


def test_explicit_flags_win_then_the_calibration_then_the_preset():
    s = resolve_settings(ConvertFlags(), _Preset(), _Calibration())
    assert (s.window, s.scale_factors, s.dimension_groups, s.target_length, s.pretrain_length) == \
        (512, [1, 8, 32], [0, 16, 48, 64], 32768, 8192)
    s = resolve_settings(ConvertFlags(window=256, target_length=1 << 17), _Preset(), _Calibration())
    assert (s.window, s.scale_factors, s.target_length) == (256, [1, 8, 32], 1 << 17)
    s = resolve_settings(ConvertFlags(), _Preset())
    assert (s.window, s.scale_factors, s.dimension_groups, s.target_length) == (1024, [2, 4], [0, 32, 64], 65536)
    # explicit factors: the calibration is not used at all (its groups belong to its factors); the preset's
    # groups still apply
    s = resolve_settings(ConvertFlags(scale_factors=[3, 5]), _Preset(), _Calibration())
    assert (s.scale_factors, s.dimension_groups, s.window) == ([3, 5], [0, 32, 64], 1024)


def test_the_calibrations_factors_never_go_with_other_groups():
    """The slip of issue 13: --calibration with --dimension-groups and no --scale-factors used to replace the
    user's groups with the calibration's without a word."""
    with pytest.raises(UsageError, match="differs from the calibration's groups"):
        resolve_settings(ConvertFlags(dimension_groups=[0, 32, 64]), None, _Calibration())
    s = resolve_settings(ConvertFlags(dimension_groups=[0, 16, 48, 64]), None, _Calibration())  # the same: fine
    assert s.dimension_groups == [0, 16, 48, 64]
    s = resolve_settings(ConvertFlags(window=8, dimension_groups=[0, 32, 64], scale_factors=[2, 2]), None, _Calibration())
    assert (s.dimension_groups, s.scale_factors) == ([0, 32, 64], [2, 2])


def test_missing_and_contradictory_settings_are_usage_errors():
    with pytest.raises(UsageError, match="--scale-factors"):
        resolve_settings(ConvertFlags(window=8))
    with pytest.raises(UsageError, match="--window"):
        resolve_settings(ConvertFlags(scale_factors=[2]))
    with pytest.raises(UsageError, match="--topk needs --dim-scores"):
        resolve_settings(ConvertFlags(window=8, scale_factors=[2], topk=4))
    with pytest.raises(UsageError, match="--dim-scores needs --topk"):
        resolve_settings(ConvertFlags(window=8, scale_factors=[2], dim_scores="s.safetensors"))


def test_a_calibrations_selection_comes_with_its_factors():
    class TopK(_Calibration):
        top_k = 12

    s = resolve_settings(ConvertFlags(), None, TopK())
    assert (s.selection, s.topk) == ("calibration", 12)
    s = resolve_settings(ConvertFlags(topk=4, dim_scores="s.safetensors"), None, TopK())
    assert (s.selection, s.topk) == ("dim_scores", 4)
    assert resolve_settings(ConvertFlags(window=8, scale_factors=[1, 1, 1]), None, TopK()).selection is None
