"""The noise model's home: ``bnprobe.noise`` depends only downward, and nothing reaches into
``bnprobe.measure`` for the noise format."""

import ast
import subprocess
import sys
from pathlib import Path

import bnprobe

PACKAGE = Path(bnprobe.__file__).parent
UPPER = ("measure", "evaluation", "training", "plots", "cli", "norms", "models", "stats", "retrain",
         "quickstart", "checkpoint")


def _imports(path: Path):
    """(module, names, inside_function) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = parts[:-child.level] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                out.append((module, [a.name for a in child.names], in_function))
            elif isinstance(child, ast.Import):
                out.extend((a.name, [], in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def test_importing_bnprobe_noise_loads_neither_measure_nor_evaluation():
    code = ("import sys, bnprobe.noise; bad = [m for m in sys.modules if m.startswith("
            "('bnprobe.measure', 'bnprobe.evaluation', 'bnprobe.training', 'bnprobe.norms'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_noise_package_imports_only_base_modules():
    for path in sorted((PACKAGE / "noise").glob("*.py")):
        for module, _, _ in _imports(path):
            assert not any(module.startswith(f"bnprobe.{u}") for u in UPPER), (path.name, module)


def test_no_lazy_measure_import_for_the_noise_format():
    for sub in ("norms", "training", "evaluation", "plots"):
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            for module, names, lazy in _imports(path):
                if module.startswith("bnprobe.measure"):
                    assert not lazy or "NoiseSpec" not in names, (path, module)
                    assert "noise_spec" not in module and "NoiseSpec" not in names, (path, module)
    assert not (PACKAGE / "measure" / "noise_spec.py").exists()
