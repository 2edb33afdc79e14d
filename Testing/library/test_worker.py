"""The worker process and its JSON-lines protocol, driven as a front end drives it (ctflow.worker.WorkerProcess)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ctflow
from ctflow.worker import EXIT_GRACE_S, PROTOCOL, WorkerProcess

REPORT = "Findings: Moderate right pleural effusion. Impressions: Right pleural effusion."
LIBRARY = str(Path(ctflow.__file__).resolve().parents[1])
ENDINGS = ("done", "cancelled", "error")


def start_worker() -> WorkerProcess:
    worker = WorkerProcess(path=(LIBRARY,))
    worker.backlog = []  # what arrived after the message until() waited for
    (ready,) = until(worker, "ready")
    assert ready["protocol"] == PROTOCOL and ready["pid"] == worker.process.pid
    return worker


def until(worker: WorkerProcess, *types: str, timeout: float = 120.0) -> list[dict]:
    """Messages up to and including the first of `types`."""
    seen, deadline = [], time.monotonic() + timeout
    while not (seen and seen[-1]["type"] in types):
        if not worker.backlog:
            assert time.monotonic() < deadline and not worker.ended, f"no {types} from the worker; saw {seen}"
            worker.backlog = worker.messages(timeout=0.5)
        while worker.backlog and not (seen and seen[-1]["type"] in types):
            seen.append(worker.backlog.pop(0))
    return seen


def generate(worker, run_id, tiny_model, **request):
    worker.send({"type": "generate", "id": run_id, "model": str(tiny_model), "device": "cpu",
                 "request": {"report": REPORT, "seed": 5, "steps": 2, **request}})


@pytest.fixture(scope="module")
def worker():
    worker = start_worker()
    yield worker
    worker.close(timeout=EXIT_GRACE_S)
    assert worker.returncode == 0


def test_a_run_streams_the_library_volume_as_npy_blocks(worker, tiny_model, tiny_pipeline):
    generate(worker, "a", tiny_model, slices=10)
    messages = until(worker, *ENDINGS)
    assert [m["type"] for m in messages] == ["loading", "planned", "block", "block", "block", "done"]
    assert all(m["id"] == "a" for m in messages)
    planned, blocks, done = messages[1], messages[2:5], messages[5]
    assert (planned["seed"], planned["steps"], planned["slices"], planned["model"]) == (5, 2, 10, "random-tiny")
    assert planned["reading"] == "pleural effusion (right)"
    assert [(b["start"], b["stop"], b["blocks_done"]) for b in blocks] == [(0, 4, 1), (4, 8, 2), (8, 10, 3)]
    assert all(Path(b["file"]).parent == Path(planned["folder"]) for b in blocks)
    hu = np.concatenate([np.load(b["file"]) for b in blocks])
    expected = tiny_pipeline.generate(ctflow.GenerationRequest(REPORT, slices=10, seed=5, steps=2))
    np.testing.assert_array_equal(hu, expected.hu)
    np.testing.assert_allclose(blocks[0]["ijk_to_ras"], expected.geometry.ijk_to_ras())
    provenance = ctflow.Provenance.from_dict(blocks[0]["provenance"])
    assert (provenance.seed, provenance.steps, provenance.model) == (5, 2, "random-tiny")
    assert done["slices"] == 10 and planned["side_guidance"] == provenance.side_guidance == 0.0
    shutil.rmtree(planned["folder"])  # the front end's part of the protocol
    generate(worker, "b", tiny_model, slices=4, side_guidance=3.0)
    messages = until(worker, *ENDINGS)
    planned, block = messages[0], messages[1]
    assert planned["side_guidance"] == ctflow.Provenance.from_dict(block["provenance"]).side_guidance == 3.0
    shutil.rmtree(planned["folder"])


def test_the_model_is_kept_until_it_changes_or_is_unloaded(worker, tiny_model):
    def run(run_id, **options):
        worker.send({"type": "generate", "id": run_id, "model": str(tiny_model), "device": "cpu",
                     "request": {"report": REPORT, "slices": 4, "steps": 1}, **options})
        messages = until(worker, *ENDINGS)
        assert messages[-1]["type"] == "done", messages[-1]
        planned = next(m for m in messages if m["type"] == "planned")
        shutil.rmtree(planned["folder"])
        return [m["type"] for m in messages if m["type"] == "loading"], planned["reused_model"]

    run("warm")
    assert run("same") == ([], True)
    assert run("other dtype", dtype="bfloat16") == (["loading"], False)
    assert run("same again", dtype="bfloat16") == ([], True)
    worker.send({"type": "unload"})
    assert until(worker, "unloaded")[-1] == {"type": "unloaded"}
    assert run("after unload", dtype="bfloat16") == (["loading"], False)


def test_cancel_stops_a_run_and_a_queued_one(worker, tiny_model):
    generate(worker, "long", tiny_model, slices=400)
    first = until(worker, "block")[-1]
    worker.send({"type": "generate", "id": "queued", "model": "/a/model/it/would/have/to/load", "device": "cpu",
                 "request": {"report": REPORT, "slices": 400}})  # waits behind "long"
    worker.send({"type": "cancel", "id": "queued"})
    worker.send({"type": "cancel", "id": "long"})
    messages = until(worker, *ENDINGS)
    assert messages[-1]["type"] == "cancelled" and first["stop"] <= messages[-1]["slices"] < 400
    # nothing is loaded or planned for a run cancelled while it waited (its model does not even exist)
    assert until(worker, *ENDINGS) == [{"type": "cancelled", "id": "queued", "slices": 0}]


def test_a_cancel_that_comes_after_the_last_block_is_a_done_run(tiny_pipeline):
    import io

    from ctflow.worker import Worker

    worker, sent = Worker(io.StringIO()), []

    def send(message):  # the front end's cancel arrives as the last block does
        sent.append(message)
        if message["type"] == "block" and message["blocks_done"] == message["blocks_expected"]:
            worker._cancelled.add("late")

    worker.send, worker._pipeline_is_loaded, worker._pipeline = send, lambda m: True, lambda m: tiny_pipeline
    worker._generate({"type": "generate", "id": "late", "request": {"report": REPORT, "slices": 8, "steps": 1}})
    assert [m["type"] for m in sent] == ["planned", "block", "block", "done"] and sent[-1]["slices"] == 8
    shutil.rmtree(sent[0]["folder"])


def test_only_the_end_of_stdin_closes_the_worker_not_memory_running_out():
    """A run can exhaust memory while the stdin reader waits; its read then fails, and is tried again."""
    import io

    from ctflow.worker import Worker

    class Starved(io.StringIO):
        failures = 2

        def readline(self, *args):
            if self.failures:
                self.failures -= 1
                raise MemoryError
            return super().readline(*args)

    worker = Worker(io.StringIO())
    worker._read(Starved('{"type": "unload"}\n'))
    assert worker._inbox.get_nowait() == {"type": "unload"} and worker._inbox.get_nowait() is None
    assert worker._closing.is_set()


def test_a_model_that_ends_the_volume_at_once_is_an_error_not_an_empty_done(steered):
    import io

    from ctflow.worker import Worker

    out = io.StringIO()
    worker = Worker(out)
    worker._pipeline_is_loaded = lambda message: True
    worker._pipeline = lambda message: steered(0, 0)  # white from the first slice on
    worker._generate({"type": "generate", "id": "e", "request": {"report": REPORT, "seed": 0, "steps": 1}})
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [m["type"] for m in replies] == ["planned", "error"]
    assert "ended the volume before its first slice" in replies[-1]["message"]
    for folder in worker._folders:
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    ("message", "error", "words"),
    [
        ({"request": {"report": "  "}}, "ReportError", "the report is empty"),
        ({"request": {"report": REPORT, "colour": "red"}}, "RequestError", "unknown request fields ['colour']"),
        ({"request": {"report": REPORT, "slices": -3}}, "RequestError", "slice count"),
        ({"request": {}}, "RequestError", "no report text"),
        ({"request": {"report": REPORT}, "dtype": "float8"}, "RequestError", "dtype must be one of"),
        ({"request": {"report": REPORT}, "model": "/no/such/model"}, "ModelError", "not found"),
        ({"request": {"report": REPORT}, "device": "tpu"}, "DeviceError", "unknown device"),
    ],
)
def test_a_bad_request_ends_its_run_with_one_error_line(worker, tiny_model, message, error, words):
    worker.send({"type": "generate", "id": "bad", "model": str(tiny_model), "device": "cpu", **message})
    reply = until(worker, *ENDINGS)[-1]
    assert (reply["type"], reply["id"], reply["error"]) == ("error", "bad", error)
    assert words in reply["message"] and "\n" not in reply["message"]


def test_running_out_of_memory_ends_the_run_with_one_line_and_the_worker_goes_on():
    """Memory really runs out, nothing simulated: once a short first run has loaded the bundled model, the worker's
    address space is capped 8 MiB above what it holds, and the next run asks for 64 slices, whose peak lies some
    36 MiB above it (measured; 32 slices lay only 20 MiB above, close enough to the old 16 MiB margin that the
    allocator's leftovers sometimes let it through). Torch's CPU allocator then raises a plain RuntimeError, not
    OutOfMemoryError. With the cap lifted, a run works again; and the worker, which held the bundled model, exits
    cleanly (it once aborted at exit about half the time: see Worker.serve)."""
    worker = start_worker()
    try:
        def run(run_id, slices):
            worker.send({"type": "generate", "id": run_id, "device": "cpu",
                         "request": {"report": REPORT, "slices": slices, "steps": 1}})
            messages = until(worker, *ENDINGS)
            for planned in (m for m in messages if m["type"] == "planned"):
                shutil.rmtree(planned["folder"])
            return messages[-1]

        assert run("loads the model", 4)["type"] == "done"
        status = Path(f"/proc/{worker.process.pid}/status").read_text()
        held = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
        uncapped = resource.prlimit(worker.process.pid, resource.RLIMIT_AS, (held + 8 * 2**20, resource.RLIM_INFINITY))
        reply = run("too big", 64)
        assert (reply["type"], reply.get("error")) == ("error", "DeviceError"), reply
        assert re.match(r"out of (cpu )?memory", reply["message"]), reply["message"]  # sampling; or planning, first
        assert "fewer slices" in reply["message"] and "\n" not in reply["message"]
        resource.prlimit(worker.process.pid, resource.RLIMIT_AS, uncapped)
        assert run("after", 4)["type"] == "done"  # the model was unloaded and loads again
    finally:
        worker.close(timeout=EXIT_GRACE_S)
    assert worker.returncode == 0


def test_lines_that_are_not_protocol_get_an_error_and_the_worker_goes_on(worker):
    worker.process.stdin.write(b"not json\n")
    worker.process.stdin.write(b'{"type": "\xff\xfe"}\n')  # not UTF-8: once ended the stdin reader, and the worker
    worker.send({"type": "dance"})
    replies = until(worker, "error") + until(worker, "error") + until(worker, "error")
    assert [(r["id"], r["error"]) for r in replies] == [(None, "ProtocolError")] * 3
    assert "unknown message type '\ufffd\ufffd'" in replies[1]["message"]
    assert "unknown message type 'dance'" in replies[2]["message"]
    worker.send({"type": "unload"})
    until(worker, "unloaded")


def test_a_run_id_that_is_not_a_string_or_number_is_refused_and_the_worker_still_closes():
    """Ids live in sets: a list or an object as an id once killed the stdin reader (the worker then outlived its
    front end) or, in a generate, the whole process."""
    worker = start_worker()
    worker.send({"type": "cancel", "id": [1]})
    worker.send({"type": "generate", "id": {"a": 1}, "request": {"report": REPORT}})
    replies = until(worker, "error") + until(worker, "error")
    assert [(r["id"], r["error"]) for r in replies] == [(None, "ProtocolError")] * 2
    assert "a run id is a string or a whole number, not [1]" in replies[0]["message"]
    worker.process.stdin.close()
    assert worker.process.wait(EXIT_GRACE_S + 5) == 0


def test_the_worker_exits_by_itself_when_its_front_end_goes_mid_run(tiny_model):
    worker = start_worker()
    generate(worker, "orphan", tiny_model, slices=400)
    folder = until(worker, "block")[-2]["folder"]
    worker.process.stdin.close()  # what the operating system does when the front end dies
    assert worker.process.wait(EXIT_GRACE_S + 5) == 0  # 0, not the watchdog's 3: it stopped the run and exited
    assert not Path(folder).exists()  # the worker removes the run folders it left


def test_kill_ends_the_whole_process_group(tiny_model):
    worker = start_worker()
    generate(worker, "stuck", tiny_model, slices=400)
    until(worker, "block")
    worker.kill()
    assert worker.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.killpg(worker.process.pid, 0)
    assert worker.messages() == [] and worker.ended


def test_a_workers_last_words_are_its_own_and_the_shared_log_does_not_grow_without_end(tmp_path):
    """Every worker of every Slicer session appends to one log: what a dead worker said must be its own line,
    never an older worker's."""
    log = tmp_path / "worker.log"
    log.write_text("RuntimeError: an older worker's last line\n")
    silent = WorkerProcess(python=shutil.which("false"), log=log)  # dies at once, saying nothing
    silent.process.wait(30)
    assert silent.log_tail() == "" and "older worker" in log.read_text()  # kept, but not quoted
    talker = WorkerProcess(python=shutil.which("sh"), log=log)  # "sh -m ctflow.worker": sh's complaint
    talker.process.wait(30)
    assert talker.log_tail() and "older worker" not in talker.log_tail()
    log.write_bytes(b"x" * (1 << 20))
    WorkerProcess(python=shutil.which("false"), log=log).process.wait(30)
    assert log.stat().st_size < 1 << 20  # started anew


def test_ctflow_worker_is_the_same_entry_point():
    result = subprocess.run([sys.executable, "-m", "ctflow", "worker"], input="", capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": LIBRARY})
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["type"] for line in result.stdout.splitlines()] == ["ready"]
