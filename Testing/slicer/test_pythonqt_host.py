"""Generation through the Logic on a main thread that holds the GIL while idle, as Slicer's does."""

from __future__ import annotations

import threading
import time



def count_while(wait, seconds: float = 1.0) -> int:
    """How far a busy Python thread counts while the main thread waits with `wait`."""
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)  # the thread is spinning
    before = count[0]
    wait(seconds)
    done = count[0] - before
    stop.set()
    thread.join()
    return done


def test_the_host_starves_python_threads_as_slicer_does(pythonqt_host):
    free = count_while(time.sleep)
    starved = count_while(pythonqt_host.idle)
    assert starved < 0.25 * free, (starved, free)  # a few switch intervals around the C call, never during it


def test_a_generation_finishes_under_the_host(scene, logic, settings, pythonqt_host, change):
    snapshots, _ = pythonqt_host.drive(logic, change(settings, slices=12), tick=0.1, timeout=120.0)
    final = snapshots[-1]
    assert (final.state, final.slices, final.blocksDone) == ("done", 12, 3)
    assert [s.firstBlock for s in snapshots].count(True) == 1
