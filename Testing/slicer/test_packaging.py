"""The extension's packaging stays in step with its files: what the Slicer build lists, ships and advertises."""

from __future__ import annotations

import json
import re
import urllib.parse
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
    description, entry = s4ext(), index_entry()
    assert "add_subdirectory(CTFlowSlicer)" in top
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in top  # as Slicer 5.10's template
    for key, variable in (("homepage", "EXTENSION_HOMEPAGE"), ("category", "EXTENSION_CATEGORY"),
                          ("iconurl", "EXTENSION_ICONURL"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS"),
                          ("description", "EXTENSION_DESCRIPTION"), ("depends", "EXTENSION_DEPENDS")):
        assert description[key] == cmake_value(variable), key
    assert (description["category"], description["scmurl"], description["scmrevision"]) == (
        entry["category"], entry["scm_url"], entry["scm_revision"])
    assert description["depends"].split() == entry["build_dependencies"] == ["PyTorch"]
    assert description["build_subdirectory"] == entry["build_subdirectory"]
    module = (MODULE / "CTFlowSlicer.py").read_text()
    assert f'categories = [translate("qSlicerAbstractCoreModule", "{entry["category"]}")]' in module


def index_entry() -> dict:
    return json.loads((REPO / "CTFlow.json").read_text())


SCHEMA_KEYS = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
               "tier": int}


def test_the_index_entry_passes_the_index_checks_offline():
    """What Slicer/ExtensionsIndex's check_description_files.py checks, without its network steps (the URLs are
    checked against the files they will serve once pushed)."""
    entry, top = index_entry(), (REPO / "CMakeLists.txt").read_text()
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(SCHEMA_KEYS)
    assert all(isinstance(entry[key], SCHEMA_KEYS[key]) for key in entry)
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"] and 1 <= entry["tier"] <= 5
    assert entry["category"] == "Image Synthesis"  # one of the checker's categories ("Synthetic Data" is not)
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert "://" in entry["scm_url"] and url.scheme in ("git", "https")
    assert "slicer" in Path(url.path).stem.lower()  # the repository name check
    assert re.findall(r"project\s*\(\s*([^\s)]+)", top, re.IGNORECASE)[0] == "CTFlow"  # == the entry's file name
    urls = [cmake_value("EXTENSION_ICONURL"), *cmake_value("EXTENSION_SCREENSHOTURLS").split()]
    for image in urls:
        assert image.startswith("https://raw.githubusercontent.com/") and image.endswith(".png"), image
        served = REPO / image.split("/main/", 1)[1]
        assert served.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "slicer_views.png" in urls[1]  # the first screenshot shows the slice views, not a bare panel
    assert (REPO / "LICENSE").is_file()
    assert entry["build_dependencies"] == ["PyTorch"]  # an extension the index has


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
