"""ctflow_train: produces the weights that the ctflow library loads. Imports ctflow; never imported by it."""

from ctflow.entry import forget_working_folder

forget_working_folder()  # under `python -m ctflow_train...`, before anything else is imported
