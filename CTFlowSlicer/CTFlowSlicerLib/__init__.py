"""Helpers of the CTFlowSlicer module. They import only the extension's bundled, torch-free ctflow; torch runs in
the generation worker's own process, never in Slicer's."""
