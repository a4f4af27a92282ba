"""The layers' arrows point down only: app -> reports -> tuner -> runner contract; runners
(torch, no Optuna) behind a child process. Checked on the source (every import statement,
module level or inside a function) and, for torch, on what importing the tuner really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runners", "tuner", "reports")
# What each layer must never import (a top-level module name).
FORBIDDEN: dict[str, set[str]] = {
    "runners": {"optuna", "tuner", "reports", "app", "streamlit"},
    "tuner": {"torch", "reports", "app", "streamlit"},
    "reports": {"torch", "app"},
}


def _imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, at module level) of every import in one file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # relative: against the file's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                name = f"{base}.{name}" if name else base
            found.append((node.lineno, name, id(node) in top))
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            if private and name.split(".")[0] != module.split(".")[0] and name.split(".")[0] in PACKAGES:
                found.append((node.lineno, f"PRIVATE {name}.{private[0]}", id(node) in top))
            # `from pkg import mod` depends on pkg.mod when that is a module (the cycle check picks).
            found += [(node.lineno, f"{name}.{alias.name}", id(node) in top) for alias in node.names]
    return found


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(root: Path) -> list[str]:
    """Every import that points up a layer, every private name imported from another of our
    packages, and every module-level import cycle."""
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(root, path)
            graph[module] = set()
            for line, name, at_top in _imports(path, module):
                head = name.split(".")[0]
                if name.startswith("PRIVATE "):
                    problems.append(f"{path.relative_to(root)}:{line}: private name across packages: {name[8:]}")
                elif head in FORBIDDEN[package]:
                    problems.append(f"{path.relative_to(root)}:{line}: {package} imports {name}")
                if at_top and head in PACKAGES:
                    graph[module].add(name)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import cycles among our modules (a `from pkg import name` edge goes to pkg
    or, when `name` is a module, to pkg.name)."""
    def targets(name: str) -> list[str]:
        return [name] if name in graph else []

    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            for nxt in targets(name):
                if state[nxt] == 1 and nxt != module:
                    cycles.append([*stack[stack.index(nxt):], nxt])
                elif state[nxt] == 0:
                    visit(nxt, [*stack, nxt])
        state[module] = 2

    for module in graph:
        if state[module] == 0:
            visit(module, [module])
    return cycles


def test_no_import_points_up_a_layer_and_none_loops():
    assert violations(ROOT) == []


def test_the_check_fails_on_planted_violations(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "runners" / "bad.py").write_text("def f():\n    import optuna\n")
    (tmp_path / "tuner" / "bad.py").write_text("from reports.frames import trials_frame\nimport torch\n")
    (tmp_path / "reports" / "a.py").write_text("from reports import b\n")
    (tmp_path / "reports" / "b.py").write_text("import reports.a\n")
    (tmp_path / "reports" / "c.py").write_text("def f():\n    from tuner.cli import _Parser\n")
    found = violations(tmp_path)
    assert any("runners/bad.py:2: runners imports optuna" in p for p in found)
    assert any("tuner imports reports.frames" in p for p in found) and any("tuner imports torch" in p for p in found)
    assert any(p.startswith("import cycle: reports.") for p in found)
    assert any("reports/c.py:2: private name across packages: tuner.cli._Parser" in p for p in found)


def test_importing_the_tuner_and_reports_loads_no_torch():
    code = ("import sys, tuner, tuner.cli, tuner.study, tuner.space, tuner.launcher, tuner.regress, tuner.export, "
            "reports.frames, reports.html; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
