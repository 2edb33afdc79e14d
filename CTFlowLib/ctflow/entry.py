"""Console entry points, kept light: Ctrl-C while torch and the rest are still importing ends in one line too, and
`python -m` cannot make ctflow import files from the working folder (a model folder, or whatever lies beside one).
"""

from __future__ import annotations

import importlib
import os
import sys

EXIT_CANCELLED = 130


def forget_working_folder() -> None:
    """`python -m ctflow` (or `-m ctflow_train...`, as torchrun starts it) puts the working folder first on sys.path,
    where any .py file would replace a module of the same name that ctflow imports. The package __init__ calls this
    while -m is still locating the module (sys.argv[0] is "-m" until then), before anything else is imported."""
    if sys.argv[:1] == ["-m"] and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


def quiet_third_party_logs(downloads: bool = False) -> None:
    """transformers/diffusers print load progress bars and advice that mean nothing to a user of ctflow or
    ctflow-train (both commands and the generation worker call this); `downloads`: keep the hub's progress bars,
    for a command whose work is a download of gigabytes. Imports neither: a command that never loads them (a
    torchrun training rank) stays as it was; they read these settings when they load, or are told now."""
    settings = [("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")]
    for name, value in settings + ([] if downloads else [("HF_HUB_DISABLE_PROGRESS_BARS", "1")]):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        diffusers = sys.modules["diffusers"]
        diffusers.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()


def ctflow() -> int:
    return run_console("ctflow", "ctflow.cli")


def run_console(program: str, module: str) -> int:
    """main() of the command-line module `module` (a fixed name, from the console script of the package that owns
    it: ctflow_train's calls this for ctflow-train, so ctflow never names the training package)."""
    try:
        return importlib.import_module(module).main()
    except KeyboardInterrupt:  # during imports or argument parsing; each command handles its own later on
        print(f"\n{program}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
