"""Helpers of the CTFlowSlicer module; only logic.py needs torch and ctflow, so the rest loads in a bare Slicer."""
