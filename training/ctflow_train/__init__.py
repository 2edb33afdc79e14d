"""ctflow_train: produces the weights that the ctflow library loads. Imports ctflow; never imported by it."""

from ctflow.entry import forget_working_folder, run_console

forget_working_folder()  # under `python -m ctflow_train...`, before anything else is imported


def console() -> int:
    """The ctflow-train console script (pyproject.toml), as light as ctflow's: see ctflow.entry."""
    return run_console("ctflow-train", "ctflow_train.cli")
