"""The shape of the package: thin callbacks on one base, cores that do not depend on callbacks, no patching."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import lightning_compress
from lightning_compress.callback import CompressionCallback

PACKAGE = Path(lightning_compress.__file__).parent

CALLBACKS = {
    "GradualPruning": "lightning_compress.pruning.gradual",
    "LowRankReplacement": "lightning_compress.low_rank.replacement",
    "QuantizationAwareTraining": "lightning_compress.quantization.qat",
    "KnowledgeDistillation": "lightning_compress.distillation.callback",
    "WeightSharing": "lightning_compress.quantization.weight_sharing",
    "BinaryWeights": "lightning_compress.quantization.binary",
    "CompressionMonitor": "lightning_compress.report",
    "CompressionBudget": "lightning_compress.budget.callback",
    "StochasticDepth": "lightning_compress.depth.callback",
    "CompactConvReplacement": "lightning_compress.low_rank.compact",
}
MAX_CALLBACK_LINES = 300


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("lightning_compress", *path.relative_to(PACKAGE).with_suffix("").parts))
        yield name.removesuffix(".__init__"), path


def _imported(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), at any depth of the file."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(("name", "module"), sorted(CALLBACKS.items()))
def test_every_callback_is_a_thin_compression_callback(name, module):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, CompressionCallback)
    assert getattr(lightning_compress, name) is cls
    lines = len(Path(inspect.getsourcefile(cls)).read_text().splitlines())
    assert lines < MAX_CALLBACK_LINES, f"{module} has {lines} lines"


def test_no_module_imports_another_schemes_callback():
    callback_modules = set(CALLBACKS.values())
    offenders = []
    for module, path in _modules():
        if path.name == "__init__.py":
            continue  # packages re-export their callbacks
        for imported in _imported(path, module) & callback_modules:
            # Within one scheme's package a callback may build on another (a depthwise-separable replacement is
            # one more low-rank form); across schemes, never.
            if imported.rpartition(".")[0] != module.rpartition(".")[0]:
                offenders.append(f"{module} imports {imported}")
    assert offenders == []


def test_no_code_assigns_a_method_on_a_module_instance():
    """Nothing sets an instance ``forward``/``training_step``: the callbacks replace child modules, never methods."""
    offenders = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets = [t.attr for t in node.targets if isinstance(t, ast.Attribute)]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "__setattr__":
                targets = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            else:
                continue
            hits = [t for t in targets if t in {"forward", "training_step", "__call__"}]
            offenders += [f"{module}:{node.lineno} sets {t}" for t in hits]
    assert offenders == []


def test_callbacks_declare_their_place_instead_of_being_looked_up_by_name():
    for name, module in CALLBACKS.items():
        cls = getattr(importlib.import_module(module), name)
        if name != "CompressionMonitor":
            assert cls.effect_order is not None, name
            assert cls.prefix, name
    source = (PACKAGE / "_lightning.py").read_text()
    assert not any(f'"{name}"' in source for name in CALLBACKS), (
        "_lightning.py orders callbacks by class name"
    )
