"""A main thread that treats Python threads the way Slicer's does.

Slicer embeds Python through PythonQt with thread support off, so its main thread holds the GIL while the Qt
event loop idles; another Python thread runs only while the main thread itself runs Python (a timer tick).
This host idles in C through ctypes.PyDLL, whose calls keep the GIL, between calls to the panel logic's
poll(). PySide6's event loop and time.sleep release the GIL, which is why the plain tests cannot see the
difference. Linux and macOS (usleep from the C library).
"""

from __future__ import annotations

import ctypes
import time

_C = ctypes.PyDLL(None)  # the process's own C library; PyDLL: the GIL stays held during the call


def idle(seconds: float) -> None:
    """The event loop waiting for the next timer event, holding the GIL as Slicer's main thread does."""
    _C.usleep(int(seconds * 1e6))


def drive(logic, settings, tick: float = 0.1, timeout: float = 300.0, on_progress=lambda progress: None):
    """Generate through the logic with a `tick`-second timer; returns (snapshots, seconds to finish).

    A timeout ends the run (cancel, then stop) and returns what it had, so a starved design gives a figure.
    """
    started = time.perf_counter()
    logic.start(settings)
    snapshots = []
    while not (snapshots and snapshots[-1].finished):
        if time.perf_counter() - started > timeout:
            logic.stop()
            break
        idle(tick)
        snapshots.append(logic.poll())
        on_progress(snapshots[-1])
    return snapshots, time.perf_counter() - started
