"""The import rules of ARCHITECTURE.md, checked on the source: who may import whom.

Read as text (every import statement, function-level ones included), so a rule breaks here the moment someone
writes the import, not when some environment happens to lack the package.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LIBRARY = ROOT / "CTFlowLib" / "ctflow"
TRAINING = ROOT / "training" / "ctflow_train"
SLICER = ROOT / "CTFlowSlicer"
# What the generation library must never reach: the training package, Slicer, Qt, VTK.
NOT_FOR_THE_LIBRARY = {"ctflow_train", "slicer", "qt", "ctk", "vtk", "PySide6", "PySide2", "PyQt5", "PyQt6",
                       "CTFlowSlicer", "CTFlowSlicerLib", "DICOMLib", "PyTorchUtils"}
# The ctflow modules training may use (ARCHITECTURE.md, "What training may use"); the pipeline's internals are not
# among them: what training shares with generation lives in conventions, config, report, sampling...
FOR_TRAINING = {"ctflow", "ctflow.autoencoder", "ctflow.batch", "ctflow.checksums", "ctflow.config",
                "ctflow.conventions", "ctflow.denoiser", "ctflow.ending", "ctflow.entry", "ctflow.errors", "ctflow.io",
                "ctflow.model_folder", "ctflow.places", "ctflow.preview", "ctflow.qa", "ctflow.report",
                "ctflow.sampling", "ctflow.text_encoder", "ctflow.volume"}


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module name, names imported from it) of every import in a file; relative imports are
    resolved in its package."""
    package = path.parent.relative_to(path.parent.parent).as_posix().replace("/", ".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(part for part in (package if node.level else "", node.module or "") if part)
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def modules(path: Path) -> set[str]:
    """Every module a file imports, "from package import module" included, and every module name a string of it
    spells out in full (importlib.import_module("ctflow_train.cli") imports as surely as an import statement)."""
    named = {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value)}
    return named | {name for _, module, names in imports(path) for name in [module, *(f"{module}.{n}" for n in names)]}


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", python_files(LIBRARY), ids=lambda p: p.name)
def test_the_library_never_imports_training_slicer_or_qt(path):
    bad = sorted(name for name in modules(path) if name.split(".")[0] in NOT_FOR_THE_LIBRARY)
    assert not bad, f"{path.name} imports {bad}: ctflow is generation only (ARCHITECTURE.md)"


def test_training_uses_only_the_modules_it_may():
    import ctflow

    wrong, seen = [], set()
    for path in python_files(TRAINING):
        for _, module, names in imports(path):
            if module.split(".")[0] != "ctflow":
                continue
            seen.add(module)
            if module == "ctflow":  # the public API, or a module it may use
                wrong += [f"{path.name}: ctflow.{n}" for n in names
                          if n not in ctflow.__all__ and f"ctflow.{n}" not in FOR_TRAINING]
            elif module not in FOR_TRAINING:
                wrong.append(f"{path.name}: {module}")
    assert not wrong, f"training imports ctflow modules outside ARCHITECTURE.md's list: {wrong}"
    assert "ctflow.conventions" in seen  # the check sees training's imports at all


def test_architecture_md_names_every_module_training_may_use():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [name for name in sorted(FOR_TRAINING - {"ctflow"}) if f"`{name.split('.')[1]}`" not in text]
    assert not missing, f"ARCHITECTURE.md does not list {missing} among the modules training may use"


def test_the_slicer_module_imports_ctflow_only_through_its_bundled_copy():
    for path in python_files(SLICER):
        assert not [name for name in modules(path) if name.split(".")[0] == "ctflow_train"], path.name
    module = SLICER / "CTFlowSlicer.py"
    source = module.read_text(encoding="utf-8").splitlines()
    bundled = next(n for n, line in enumerate(source, 1) if line.startswith("resources.useBundledLibrary()"))
    needs_ctflow = {f"CTFlowSlicerLib.{path.stem}" for path in (SLICER / "CTFlowSlicerLib").glob("*.py")
                    if any(name.split(".")[0] == "ctflow" for name in modules(path))}
    assert needs_ctflow, "no CTFlowSlicerLib module imports ctflow: the check would see nothing"
    for line, name, names in imports(module):
        used = {name, *(f"{name}.{n}" for n in names)}
        if any(n.split(".")[0] == "ctflow" for n in used) or used & needs_ctflow:
            assert line > bundled, f"CTFlowSlicer.py line {line} imports {name} before resources.useBundledLibrary()"
