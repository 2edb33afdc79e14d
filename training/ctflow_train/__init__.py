"""ctflow_train: produces the weights that the ctflow library loads. Imports ctflow; never imported by it."""
