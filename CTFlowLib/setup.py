"""Builds carry the bundled demo model, which lives outside this folder (Resources/Models/ctflow-demo), as
ctflow/models/ctflow-demo, so `pip install ./CTFlowLib` finds it from any folder (model_folder.default_model).
Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEMO_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "ctflow-demo"


class BuildWithDemoModel(build_py):
    def run(self):
        super().run()
        if DEMO_MODEL.is_dir() and not self.editable_mode:  # an editable install finds it in the repository
            target = Path(self.build_lib) / "ctflow" / "models" / DEMO_MODEL.name
            shutil.copytree(DEMO_MODEL, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithDemoModel})
