"""A generation worker process, driven by JSON lines: `ctflow worker` or `python -m ctflow.worker`.

Front ends whose main thread must stay free (3D Slicer, whose embedded Python never releases the GIL while
idle, so a generation thread there would crawl) run generation in this separate process. It loads a model
once and keeps it for later runs, streams each decoded block as an .npy file, and exits by itself when its
stdin closes (the front end quit or died), so it never outlives its parent holding a GPU.

Protocol, version 1. One JSON object per line, UTF-8, each with a "type". The worker's stdout carries only
protocol lines (anything else a library prints goes to stderr, which is the worker's log).

Front end -> worker (stdin):
  {"type": "generate", "id": ID, "request": {...}, "model": M, "revision": R, "device": D, "dtype": T}
      request: the fields of ctflow.GenerationRequest (report, impressions, slices, seed, steps, guidance,
      side_guidance, finding_guidance, sampler, shift); null or missing means the model's default. model: a folder
      or hub id (null: the default model); device: auto, cpu, cuda or cuda:N; dtype: null (float32 on CPU, bfloat16
      on a GPU that has it), float32, bfloat16 or float16. Runs are served one at a time, in order.
  {"type": "cancel", "id": ID}     stop that run at its next sampling step (also when it is still queued)
  {"type": "unload"}               free the loaded model (GPU memory included); the next run loads it again
  end of input (stdin closed)      cancel, then exit; after EXIT_GRACE_S the process exits regardless

Worker -> front end (stdout):
  {"type": "ready", "protocol": 1, "ctflow_version", "torch_version", "pid", "cuda": bool, "gpu": name or null,
   "gpu_memory_gb": float or null}                                   once, at start
  {"type": "loading", "id", "model"}                                 a model is being loaded (not when kept)
  {"type": "planned", "id", "folder", "reused_model": bool, "seed", "steps", "guidance", "side_guidance" (as
   applied: 0 when the report names no side), "finding_guidance" (as applied: 0 when it reports no finding),
   "sampler", "shift", "slices", "notices": [str], "reading" (report.reading_of; "" for an embedding), "model",
   "device"}
                                                                     the request is valid; sampling starts
  {"type": "block", "id", "file", "index", "start", "stop", "blocks_done", "blocks_expected", "elapsed_s",
   "block_s", "eta_s", "time", "ijk_to_ras": 4x4, "provenance": {str: str}}
      file: an .npy of int16 HU [stop - start, rows, cols], slices [start, stop) of the volume, in `folder`;
      time: when it was written (Unix time), for measuring how soon a front end shows it.
  {"type": "done", "id", "slices", "elapsed_s"}                      the volume is complete
  {"type": "cancelled", "id", "slices"}                              stopped on request; the blocks sent stand
  {"type": "error", "id" (null when not about a run), "error": class name, "message": one line}
  {"type": "unloaded"}

Each run ends with exactly one of done, cancelled or error. `folder` is a fresh temporary folder per run:
the front end removes it once it has read the blocks; the worker removes any left over when it exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO

PROTOCOL = 1
EXIT_GRACE_S = 10.0  # after stdin closes, the longest the worker may take to stop a run and exit
MEMORY_RETRY_S = 0.1  # the stdin reader's wait before reading again when memory has run out
READER_JOIN_S = 1.0  # at exit, how long to wait for the stdin reader to finish (it is done at once after EOF)
LOG_LIMIT = 1 << 20  # a shared worker log past this size (bytes) is started anew by the next worker
DTYPES = ("float32", "bfloat16", "float16")
REQUEST_FIELDS = ("report", "impressions", "slices", "seed", "steps", "guidance", "side_guidance", "finding_guidance",
                  "sampler", "shift")


class Worker:
    """The serving side: one run at a time on the main thread; a reader thread takes stdin and cancels."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._write_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: set = set()
        self._closing = threading.Event()
        self._loaded: tuple[tuple, object] | None = None  # ((model, revision, device, dtype), CTFlowPipeline)
        self._folders: list[Path] = []

    def send(self, message: dict) -> None:
        with self._write_lock:
            try:
                self._out.write(json.dumps(message) + "\n")
                self._out.flush()
            except (OSError, ValueError):  # the front end is gone: stop the run and leave
                self._closing.set()

    def serve(self, stdin: IO[str]) -> None:
        """Answer requests until stdin closes; then remove the run folders left and return."""
        import torch

        from . import __version__

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_properties(0) if cuda else None
        self.send({"type": "ready", "protocol": PROTOCOL, "ctflow_version": __version__,
                   "torch_version": torch.__version__, "pid": os.getpid(), "cuda": cuda, "gpu": gpu and gpu.name,
                   "gpu_memory_gb": gpu and round(gpu.total_memory / 2**30, 1)})
        # Both threads start now, while memory is free: a run that exhausts it must not keep them from starting.
        reader = threading.Thread(target=self._read, args=(stdin,), name="ctflow-worker-stdin", daemon=True)
        watchdog = threading.Thread(target=self._exit_when_stuck, name="ctflow-worker-watchdog", daemon=True)
        reader.start()
        watchdog.start()
        try:
            while (message := self._inbox.get()) is not None and not self._closing.is_set():
                if message["type"] == "generate":
                    self._generate(message)
                elif message["type"] == "unload":
                    self._unload()
                    self.send({"type": "unloaded"})
                else:
                    self._error(None, "ProtocolError", f"unknown message type {message['type']!r}")
        finally:
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            # The model's tensors are freed here, and the reader has finished, before the interpreter winds down: a
            # garbage collection on the reader thread that frees tensors then aborts the process (torch releases
            # the GIL while freeing; a thread that takes it back during finalization is ended mid-C++ frame).
            self._unload()
            reader.join(READER_JOIN_S)

    def _read(self, stdin: IO[str]) -> None:
        """stdin reader: cancels act at once (a run is in progress); everything else waits its turn. Only the end of
        stdin closes the worker: neither a bad line nor memory that a run has exhausted does."""
        try:
            while True:
                try:
                    line = stdin.readline()
                except MemoryError:  # what was read stays in the reader's buffer for the next try
                    time.sleep(MEMORY_RETRY_S)
                    continue
                if not line:
                    break
                if line.strip():
                    self._take(line)
        finally:
            self._closing.set()  # the front end is gone: stop the run at its next step, then leave
            self._inbox.put(None)
            print("ctflow worker: stdin closed; stopping", file=sys.stderr, flush=True)

    def _exit_when_stuck(self) -> None:
        """Once the worker is told to close, it exits within EXIT_GRACE_S even if a step never returns."""
        self._closing.wait()
        time.sleep(EXIT_GRACE_S)
        os._exit(3)

    def _take(self, line: str) -> None:
        try:
            message = json.loads(line)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            self._error(None, "ProtocolError", f"not a protocol line (a JSON object with a type): {line[:80]!r}")
            return
        except MemoryError:
            self._error(None, "DeviceError", "out of memory reading a request line: send it again")
            return
        run_id = message.get("id")
        if not isinstance(run_id, (str, int, type(None))):  # ids are kept in sets and echoed back
            self._error(None, "ProtocolError", f"a run id is a string or a whole number, not {run_id!r}"[:200])
        elif kind == "cancel":
            self._cancelled.add(run_id)
        else:
            self._inbox.put(message)

    def _error(self, run_id, kind: str, message: str) -> None:
        self.send({"type": "error", "id": run_id, "error": kind, "message": message})

    def _generate(self, message: dict) -> None:
        from .devices import is_out_of_memory
        from .errors import CTFlowError, OutOfMemory, RequestError
        from .pipeline import ENDED_BEFORE_FIRST_SLICE, GenerationRequest

        run_id = message.get("id")
        cancel = _RunCancel(run_id, self._cancelled, self._closing)
        made = 0
        if cancel.is_set():  # cancelled while queued: no model is loaded for it
            self.send({"type": "cancelled", "id": run_id, "slices": 0})
            self._cancelled.discard(run_id)
            return
        try:
            fields = message.get("request") or {}
            unknown = sorted(set(fields) - set(REQUEST_FIELDS))
            if unknown:
                raise RequestError(f"unknown request fields {unknown}; known: {', '.join(REQUEST_FIELDS)}")
            if not isinstance(fields.get("report"), str):
                raise RequestError("the request has no report text")
            request = GenerationRequest(**{key: value for key, value in fields.items() if value is not None})
            reused = self._pipeline_is_loaded(message)
            pipeline = self._pipeline(message)
            plan = pipeline.plan(request)
            folder = Path(tempfile.mkdtemp(prefix="ctflow-run-"))
            self._folders.append(folder)
            resolved = plan.request
            self.send({"type": "planned", "id": run_id, "folder": str(folder), "reused_model": reused,
                       "seed": resolved.seed, "steps": resolved.steps, "guidance": resolved.guidance,
                       "side_guidance": plan.guidance.side, "finding_guidance": plan.guidance.finding,
                       "sampler": resolved.sampler, "shift": resolved.shift, "slices": resolved.slices,
                       "notices": list(plan.notices), "reading": plan.reading, "model": pipeline.model_id,
                       "device": str(pipeline.device)})
            started, complete = time.perf_counter(), False
            for block in pipeline.stream(plan, cancel):
                file = folder / f"block-{block.index:04d}.npy"
                _save_npy(file, block.hu)
                made, complete = block.stop, block.is_last
                self.send({"type": "block", "id": run_id, "file": str(file), "index": block.index,
                           "start": block.start, "stop": block.stop, "blocks_done": block.blocks_done,
                           "blocks_expected": block.blocks_expected, "elapsed_s": block.elapsed_s,
                           "block_s": block.block_s, "eta_s": block.eta_s, "time": time.time(),
                           "ijk_to_ras": block.geometry.ijk_to_ras().tolist(),
                           "provenance": block.provenance.as_dict()})
            if cancel.is_set() and not complete:  # a cancel after the last block is too late to cancel anything
                self.send({"type": "cancelled", "id": run_id, "slices": made})
            elif made == 0:
                self._error(run_id, "CTFlowError", ENDED_BEFORE_FIRST_SLICE)
            else:
                self.send({"type": "done", "id": run_id, "slices": made, "elapsed_s": time.perf_counter() - started})
        except OutOfMemory as exc:
            self._unload()  # the next run loads the model afresh, into memory as empty as it gets
            self._error(run_id, "DeviceError", str(exc))
        except CTFlowError as exc:
            self._error(run_id, type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - the run ends with one line; the traceback goes to the log
            if is_out_of_memory(exc):  # outside the pipeline: planning, saving a block
                self._unload()
                self._error(run_id, "DeviceError", "out of memory: ask for fewer slices, or close other programs "
                                                   "using the memory")
            else:
                traceback.print_exc(file=sys.stderr)
                self._error(run_id, type(exc).__name__, f"unexpected {type(exc).__name__}: {exc} (see the worker log)")
        finally:
            self._cancelled.discard(run_id)

    def _key(self, message: dict) -> tuple:
        dtype = message.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            from .errors import RequestError

            raise RequestError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        return message.get("model"), message.get("revision"), message.get("device") or "auto", dtype

    def _pipeline_is_loaded(self, message: dict) -> bool:
        return self._loaded is not None and self._loaded[0] == self._key(message)

    def _pipeline(self, message: dict):
        """The requested model: the one kept from the last run when model, revision, device and dtype agree."""
        import torch

        from .entry import quiet_third_party_logs
        from .hub import default_model
        from .pipeline import CTFlowPipeline

        key = self._key(message)
        if self._loaded is None or self._loaded[0] != key:
            self._unload()  # free the old model before loading the next
            model, revision, device, dtype = key
            model = model if model is not None else str(default_model())
            self.send({"type": "loading", "id": message.get("id"), "model": model})
            quiet_third_party_logs()
            pipeline = CTFlowPipeline.from_pretrained(
                model, revision=revision, device=device, dtype=getattr(torch, dtype) if dtype else None)
            self._loaded = (key, pipeline)
        return self._loaded[1]

    def _unload(self) -> None:
        import gc

        import torch

        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclasses.dataclass
class _RunCancel:
    """The pipeline's cancel flag for one run: a cancel message for it, or the front end gone."""

    run_id: object
    cancelled: set
    closing: threading.Event

    def is_set(self) -> bool:
        return self.run_id in self.cancelled or self.closing.is_set()


def _save_npy(path: Path, array) -> None:
    """Written beside, then renamed: a reader never sees half a block."""
    import numpy as np

    partial = path.with_suffix(".part")
    with open(partial, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    """Serve on stdin/stdout. stdout is kept for the protocol: Python's and C's own prints go to stderr."""
    import argparse

    argparse.ArgumentParser(prog="ctflow worker", description=__doc__.splitlines()[0]).parse_args(argv)
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)  # bad bytes: a bad line
    Worker(protocol).serve(stdin)
    return 0


class WorkerProcess:
    """The front end's side, for a main thread that must never wait: start, send, take what arrived, stop.

    Needs neither torch nor Qt. Reads are non-blocking (os.set_blocking; on Windows pipes too since Python
    3.12). The worker runs in its own process group, so kill() ends everything it started.
    """

    def __init__(self, python: str | None = None, log: str | os.PathLike | None = None,
                 path: tuple[str, ...] = ()) -> None:
        """python: the interpreter (default: this one); log: a file for the worker's stderr (default: inherited);
        path: folders put first on the worker's PYTHONPATH (e.g. a bundled copy of ctflow)."""
        if sys.platform == "win32" and sys.version_info < (3, 12):
            from .errors import CTFlowError

            raise CTFlowError("the Slicer worker needs Python 3.12 on Windows (non-blocking pipes; Slicer 5.10 has it)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).strip(os.pathsep)
        env["PYTHONIOENCODING"] = "utf-8"  # its log is read as UTF-8, whatever the Windows code page
        self.log = Path(log) if log else None
        self._log_start = 0  # where this worker's lines begin: other workers (other Slicer sessions) wrote before
        stderr = None
        if self.log:  # appended to, so a worker's words outlive it; started anew once it outgrows LOG_LIMIT
            stderr = open(self.log, "ab" if not self.log.is_file() or self.log.stat().st_size < LOG_LIMIT else "wb")
            self._log_start = stderr.seek(0, os.SEEK_END)
        options = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
                   if sys.platform == "win32" else {"start_new_session": True})
        try:
            self.process = subprocess.Popen([python or sys.executable, "-m", "ctflow.worker"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, env=env, **options)
        finally:
            if stderr is not None:
                stderr.close()
        os.set_blocking(self.process.stdout.fileno(), False)
        self._pending = b""
        self.ended = False  # its stdout closed: it exited or is about to
        self.last_message: dict | None = None

    def send(self, message: dict) -> bool:
        """False when the worker is gone (its exit shows in returncode)."""
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def messages(self, timeout: float = 0.0) -> list[dict]:
        """Every complete line that arrived, without waiting (or waiting up to `timeout` s for the first one)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self._read_lines()
            if lines or self.ended or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                continue  # not protocol: the worker keeps its stdout clean, so only a broken interpreter says this
        if messages:
            self.last_message = messages[-1]
        return messages

    def _read_lines(self) -> list[bytes]:
        chunks = []
        while not self.ended:
            try:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self.ended = True
            chunks.append(chunk)
        *lines, self._pending = (self._pending + b"".join(chunks)).split(b"\n")
        return [line for line in lines if line.strip()]

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 1) -> str:
        """The last lines this worker wrote to its log: what it said before it died."""
        if self.log is None or not self.log.is_file():
            return ""
        with open(self.log, "rb") as handle:
            handle.seek(max(self._log_start, handle.seek(0, os.SEEK_END) - 8192))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def close(self, timeout: float = 1.0) -> None:
        """Close its stdin (it stops and exits by itself); kill it if it has not within `timeout` s."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """End the worker and every process it started, now."""
        if self.process.poll() is None:
            if sys.platform == "win32":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW)  # Slicer has no console to lend it
            else:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.ended = True
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
