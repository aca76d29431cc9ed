"""The house: imports point down (core <- io <- data <- pipelines <- cli), none hides in a
function body, and the core imports with its own dependencies only (jax, jaxlib, optax, numpy,
chex)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "epilsr"
# A layer may import the layers listed for it (and itself); the core is every module of
# src/epilsr that is not in a sub-package, except viz (pictures; needs pillow); cli (the installed
# commands) sits on top and no other layer may import it.
ALLOWED = {
    "core": {"core"},
    "io": {"core", "io"},
    "data": {"core", "io", "data"},
    "pipelines": {"core", "io", "data", "pipelines", "viz"},
    "viz": {"core", "io", "viz"},
    "cli": {"core", "io", "data", "pipelines", "viz", "cli"},
}
OPTIONAL = ("tifffile", "imagecodecs", "PIL", "hydra", "omegaconf", "tqdm", "skimage", "rasterio",
            "scipy", "matplotlib", "torch")


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "epilsr":
        return "external"
    if len(parts) > 1 and parts[1] in ("io", "data", "pipelines", "viz", "cli"):
        return parts[1]
    return "core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(tree: ast.AST, module: str):
    """(line, imported module, in a function body) for every import statement."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    pkg = module.split(".")[: -child.level] if child.level else []
                    base = ".".join([*pkg, base]) if base else ".".join(pkg)
                if base == "epilsr":  # `from epilsr import metrics`: the names are modules
                    out.extend((child.lineno, f"epilsr.{a.name}", in_function)
                               for a in child.names)
                else:
                    out.append((child.lineno, base, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    module = _module_name(path)
    layer = _layer(module) if module != "epilsr" else "core"
    for line, target, _ in _imports(ast.parse(path.read_text()), module):
        if module == "epilsr" and target.startswith("epilsr.") and _layer(target) != "core":
            continue  # the package's lazy __getattr__ table names the layers above by string
        to = _layer(target)
        if to != "external":
            assert to in ALLOWED[layer], f"{path.name}:{line}: {layer} module imports {target}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_epilsr_import_inside_a_function(path):
    module = _module_name(path)
    inner = [(line, t) for line, t, f in _imports(ast.parse(path.read_text()), module)
             if f and t.startswith("epilsr")]
    assert not inner, f"{path.name}: imports inside function bodies {inner}"


def test_the_checker_can_fail():
    tree = ast.parse("from epilsr.io import geotiff\ndef f():\n    import epilsr.pipelines\n")
    found = _imports(tree, "epilsr.lsr")
    assert [(t, f) for _, t, f in found] == [("epilsr.io", False), ("epilsr.pipelines", True)]
    assert _layer("epilsr.io") not in ALLOWED["core"]
    assert all("cli" not in allowed for layer, allowed in ALLOWED.items() if layer != "cli")


def test_core_imports_with_core_dependencies_only():
    """`import epilsr` and `log_posterior` work with every optional dependency blocked."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {OPTIONAL!r}:
            raise ImportError('blocked optional dependency: ' + name)
sys.meta_path.insert(0, Block())
import jax, numpy as np
import epilsr
epi = epilsr.init_epitome(jax.random.key(0), size=9, channels=3)
patches = jax.random.uniform(jax.random.key(1), (2, 5, 5, 3))
lp = epilsr.log_posterior(epi, patches, temperature=1.0)
assert lp.shape == (2, 1, 9, 9) and np.allclose(np.exp(lp).sum(axis=(1, 2, 3)), 1, atol=1e-4)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r})
assert not loaded, loaded
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC.parent), "JAX_PLATFORMS": "cpu",
                              "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
