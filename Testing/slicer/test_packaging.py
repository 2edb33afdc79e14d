"""The extension's packaging stays in step with its files: what the Slicer build lists, ships and advertises."""

from __future__ import annotations

import re
from pathlib import Path

import ctflow
from PIL import Image

from CTFlowSlicerLib import resources

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "CTFlowSlicer"


def cmake_list(text: str, name: str) -> list[str]:
    body = re.search(rf"set\({name}\s+(.*?)\)", text, re.DOTALL).group(1)
    return [item.replace("${MODULE_NAME}", "CTFlowSlicer") for item in body.split()]


def cmake_value(name: str) -> str:
    return re.search(rf'set\({name} "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)


def s4ext() -> dict[str, str]:
    lines = (REPO / "CTFlow.s4ext").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))


def test_the_module_build_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    shipped = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert set(cmake_list(text, "MODULE_PYTHON_SCRIPTS")) == scripts
    assert set(cmake_list(text, "MODULE_PYTHON_RESOURCES")) == shipped
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_metadata_agrees_everywhere():
    top = (REPO / "CMakeLists.txt").read_text()
    description = s4ext()
    assert re.search(r"^project\(CTFlow\)$", top, re.MULTILINE) and (REPO / "CTFlow.s4ext").is_file()
    assert "add_subdirectory(CTFlowSlicer)" in top and (REPO / "LICENSE").is_file()
    for key, variable in (("homepage", "EXTENSION_HOMEPAGE"), ("category", "EXTENSION_CATEGORY"),
                          ("iconurl", "EXTENSION_ICONURL"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS"),
                          ("description", "EXTENSION_DESCRIPTION"), ("depends", "EXTENSION_DEPENDS")):
        assert description[key] == cmake_value(variable), key
    assert 'self.parent.categories = ["Synthetic Data"]' in (MODULE / "CTFlowSlicer.py").read_text()
    assert cmake_value("EXTENSION_CATEGORY") == "Synthetic Data"
    for url in (description["iconurl"], description["screenshoturls"]):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url


def test_icons_are_128_pixel_pngs():
    for icon in (REPO / "Resources" / "Icons" / "CTFlow.png", MODULE / "Resources" / "Icons" / "CTFlowSlicer.png"):
        with Image.open(icon) as image:
            assert (image.format, image.size) == ("PNG", (128, 128))


def test_sample_reports_are_complete_chest_ct_reports():
    reports = resources.sampleReports()
    assert 4 <= len(reports) <= 6 and "Normal chest" in reports
    for title, path in reports.items():
        report = ctflow.parse_report(path.read_text(encoding="utf-8"))
        assert len(report.findings) > 300 and report.impressions, title
