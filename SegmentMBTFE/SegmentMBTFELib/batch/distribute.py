"""A batch spread over several processes: one per GPU on this machine, or one case per task on a Dask cluster.

    segment-mbtfe predict -i CASES -o OUT                      # several GPUs: one worker process per GPU
    segment-mbtfe predict -i CASES -o OUT --devices cpu,cpu    # the same with the devices named (or --workers N)
    segment-mbtfe predict -i CASES -o OUT --dask tcp://scheduler:8786

Worker processes: the cases are split with the batch's own parts (batch.shard), each part runs in a process of
its own (`python -m SegmentMBTFELib.batch.distribute`, the case list on its stdin) with CUDA_VISIBLE_DEVICES set to
its GPU, loads the model once and segments its cases with run_batch; every finished case comes back as one
JSON line, and this process writes the one manifest. A worker that dies fails only the cases it had left.

Dask: the cluster is an existing engine, so nothing here schedules: each case is one task
(segment_case), the model is loaded once per Dask worker process (a module-level cache; one case at a time
per process, torch uses the cores), the output is written by the worker into the output folder, which must
be on a filesystem the workers share with this machine (as must the inputs and the model folder). A case
that fails, or whose task fails (a worker that dies), fails alone. Finished outputs are skipped here
before any task is sent, as in every batch.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import Cancelled, InputError, SegmentError
from .cases import FAILED, BatchSettings, Case, CaseResult, run_batch, settled_result, shard

DASK_INSTALL = "--dask needs the distributed package: pip install 'SegmentMBTFE[dask]' (or pip install distributed)."


@dataclass
class ModelSpec:
    """What a worker elsewhere needs to load the very model this process opened (the version resolved here)."""
    folder: str
    configuration: Optional[str]
    folds: Optional[List[str]]
    checkpoint: str
    version_id: str

    @classmethod
    def of(cls, model, version) -> "ModelSpec":
        return cls(str(version.path), model.configuration.name, list(model.folds), model.checkpoint_name,
                   version.id)


@dataclass
class _VersionId:
    id: str


class Collector:
    """The results of cases finishing in any order, kept in the cases' order for the one manifest."""

    def __init__(self, count: int, manifest=None, on_result: Callable = None, progress: Callable = None):
        self.results: Dict[int, CaseResult] = {}
        self.count, self.manifest, self.on_result, self.progress = count, manifest, on_result, progress

    def add(self, index: int, result: CaseResult, force: bool = False) -> None:
        self.results[index] = result
        if self.manifest is not None:
            self.manifest.update(self.ordered(), force=force)
        if self.on_result is not None:
            self.on_result(result)
        if self.progress is not None:
            self.progress(len(self.results) / self.count, f"{len(self.results)} of {self.count} cases")

    def ordered(self) -> List[CaseResult]:
        return [self.results[i] for i in sorted(self.results)]

    def close(self) -> List[CaseResult]:
        if self.manifest is not None:
            self.manifest.update(self.ordered(), force=True)
        return self.ordered()


# ----------------------------------------------------------------------------------- one process per device

def worker_devices(device: str, workers: Optional[int] = None, devices: Optional[str] = None) -> List[str]:
    """The devices of the worker processes to start ([] for none: this process segments). --devices names
    them; --workers N takes N of `device` (cuda:0..N-1 for a GPU); else one per GPU when several are seen."""
    from ..inference.devices import choose_device
    if devices:
        chosen = [d.strip() for d in devices.split(",") if d.strip()]
        for name in chosen:
            choose_device(name)  # an unknown or missing device is refused now, in one sentence
        return chosen if len(chosen) > 1 else []
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be 1 or more; got {workers}.")
    wanted = (device or "auto").lower()
    if wanted in ("auto", "cuda"):
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > 1 or (gpus and workers):
            count = workers or gpus
            if count > gpus:
                raise InputError(f"--workers {count} asks for one GPU each, but {gpus} GPU(s) are visible.")
            return [f"cuda:{i}" for i in range(count)] if count > 1 else []
    return [choose_device(wanted).type] * workers if workers and workers > 1 else []


def settle_here(model, cases: Sequence[Case], output_dir, settings: BatchSettings, collector: Collector) -> list:
    """Record the cases known without segmenting (refused while listing, or finished by an earlier run), so
    no worker is sent them; the others, as (index, case)."""
    pending = []
    for index, case in enumerate(cases):
        settled = settled_result(model, case, Path(output_dir) / f"{case.name}{settings.extension}", settings)
        if settled is not None:
            collector.add(index, settled)
        else:
            pending.append((index, case))
    return pending


def run_processes(devices: Sequence[str], spec: ModelSpec, model, cases: Sequence[Case], output_dir,
                  settings: BatchSettings, collector: Collector) -> List[CaseResult]:
    """Segment `cases` with one worker process per device (part k of len(devices) each); `model` (loaded
    here) only settles the cases already done."""
    cpu_workers = sum(d == "cpu" for d in devices) or 1
    threads = max(1, (os.cpu_count() or 1) // cpu_workers)
    indexed = settle_here(model, cases, output_dir, settings, collector)
    workers = []
    for k, device in enumerate(devices):
        part = shard(indexed, len(devices), k + 1)
        if part:
            name = f"worker {k + 1} of {len(devices)} ({device})"
            workers.append(_PartProcess(name, device, part, spec, output_dir, settings, threads))
    replies: "queue.Queue" = queue.Queue()
    try:
        for worker in workers:
            worker.start(replies)
        running = len(workers)
        while running:
            worker, reply = replies.get()
            if reply is None:
                running -= 1
                for index, result in worker.unfinished():
                    collector.add(index, result)
            else:
                collector.add(*worker.settle(reply))
    finally:
        for worker in workers:
            worker.stop()
        while not replies.empty():  # what finished while stopping still goes into the manifest
            worker, reply = replies.get()
            if reply is not None:
                collector.add(*worker.settle(reply))
    return collector.close()


class _PartProcess:
    """One worker process of a batch, with its part of the cases: they go in on stdin (JSON), results come out
    one JSON line each."""

    def __init__(self, name: str, device: str, part, spec: ModelSpec, output_dir, settings: BatchSettings,
                 threads: int):
        self.name, self.device, self.part, self.done = name, device, part, set()
        gpu = device.split(":", 1)[1] if device.startswith("cuda:") else None
        self.request = {"model": asdict(spec), "output_dir": str(output_dir), "threads": threads,
                        "settings": asdict(replace(settings, device="cuda" if gpu is not None else device)),
                        "cases": [[index, case.name, [str(p) for p in case.inputs], case.problem]
                                  for index, case in part]}
        self.env = dict(os.environ)
        if gpu is not None:  # cuda:i is the i-th GPU this process sees: a CUDA_VISIBLE_DEVICES already set maps it
            seen = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
            self.env["CUDA_VISIBLE_DEVICES"] = seen[int(gpu)] if int(gpu) < len(seen) else gpu
        package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding the engine, wherever it is
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, self.env.get("PYTHONPATH")) if p)
        self.process, self.reader = None, None

    def start(self, replies: "queue.Queue") -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "SegmentMBTFELib.batch.distribute"], env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, args=(replies,), daemon=True, name=self.name)
        self.reader.start()

    def _read(self, replies: "queue.Queue") -> None:
        try:
            self.process.stdin.write(json.dumps(self.request).encode())
            self.process.stdin.close()
        except OSError:  # it died at once: its cases are reported as unfinished
            pass
        for line in self.process.stdout:
            try:
                replies.put((self, json.loads(line)))
            except ValueError:
                continue
        self.process.wait()
        replies.put((self, None))

    def settle(self, reply: dict):
        index = int(reply.pop("index"))
        result = CaseResult(**reply)
        if result.device.startswith("cuda"):  # the process sees its GPU as cuda:0; the manifest names it
            result.device = self.device
        result.notes.append(self.name)
        self.done.add(index)
        return index, result

    def unfinished(self):
        """The cases it did not report: it died, or was stopped, before them."""
        code = self.process.returncode
        why = "it was stopped" if code in (-signal.SIGTERM, -signal.SIGINT, 130, 143) else f"exit code {code}"
        for index, case in self.part:
            if index not in self.done:
                yield index, CaseResult(case.name, FAILED, f"its {self.name} ended ({why}) before segmenting it; "
                                                           "rerun to segment it", inputs=[str(p) for p in case.inputs],
                                        notes=[self.name])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.reader.join(timeout=10)


def _worker_main() -> int:
    """A worker process: the request on stdin, one JSON line per finished case on stdout (nothing else)."""
    output = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever else prints goes to stderr
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        request = json.loads(sys.stdin.read())
        import torch
        torch.set_num_threads(int(request["threads"]))
        spec = ModelSpec(**request["model"])
        model = _load(spec)
        cases = [(index, Case(name, [Path(p) for p in inputs], problem))
                 for index, name, inputs, problem in request["cases"]]
        settings = BatchSettings(**request["settings"])
        indices = iter([index for index, _ in cases])

        def report(result: CaseResult):
            output.write(json.dumps({"index": next(indices), **asdict(result)}) + "\n")
        run_batch(model, _VersionId(spec.version_id), [c for _, c in cases], request["output_dir"], settings,
                  on_result=report)
    except KeyboardInterrupt:
        return 130
    except SegmentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


# ------------------------------------------------------------------------------------------------------ Dask

_MODELS = None        # this Dask worker process's loaded model (inference/loading.ModelCache)
_COUNTS = {"model loads": 0, "cases": 0}   # what this process did: one load per model, however many cases
_ONE_CASE = threading.Lock()   # a Model runs one case at a time (its network holds one fold's weights)


def _load(spec: ModelSpec):
    from ..inference.loading import ModelCache
    global _MODELS
    if _MODELS is None:
        _MODELS = ModelCache(keep=1)
    model = _MODELS.get(spec.folder, spec.configuration, spec.folds, spec.checkpoint)
    _COUNTS["model loads"] += not _MODELS.last_was_cached
    return model


def worker_counts() -> dict:
    """How many times this process loaded a model and how many cases it was given
    (Client.run(worker_counts) asks every Dask worker)."""
    return dict(_COUNTS)


def segment_case(spec: ModelSpec, case: Case, output_dir: str, settings: BatchSettings) -> CaseResult:
    """A Dask task: one case, segmented by the worker that runs it and written into output_dir."""
    with _ONE_CASE:
        _COUNTS["cases"] += 1
        model = _load(spec)
        [result] = run_batch(model, _VersionId(spec.version_id), [case], output_dir, replace(settings, overlap=False))
    try:
        from distributed import get_worker
        result.notes.append(f"Dask worker {get_worker().address}")
    except (ImportError, ValueError):
        pass
    return result


def run_on_dask(address: str, spec: ModelSpec, model, cases: Sequence[Case], output_dir, settings: BatchSettings,
                collector: Collector) -> List[CaseResult]:
    """One task per case not settled here (finished earlier, or refused while listing) on the cluster at
    `address`; the results come back as they finish and go into the one manifest."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InputError(DASK_INSTALL) from None
    pending = dict(settle_here(model, cases, output_dir, settings, collector))
    if not pending:
        return collector.close()
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"Cannot reach the Dask scheduler at {address} ({type(error).__name__}: "
                         f"{str(error)[:160]}); check the address and that the scheduler runs.") from None
    futures = {}
    try:
        for index, case in pending.items():
            futures[client.submit(segment_case, spec, case, str(output_dir), settings, pure=False,
                                  key=f"segment-mbtfe-{case.name}-{os.getpid()}-{index}")] = index
        for future in as_completed(futures):
            collector.add(futures[future], _task_result(future, pending[futures[future]]))
    finally:
        client.cancel([f for f in futures if not f.done()])
        client.close()
    return collector.close()


def _task_result(future, case: Case) -> CaseResult:
    try:
        return future.result()
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - a task that failed (its worker died, ...) fails its case only
        return CaseResult(case.name, FAILED, f"its Dask task failed ({type(error).__name__}: {str(error)[:200]}); "
                                             "rerun to segment it", inputs=[str(p) for p in case.inputs])


if __name__ == "__main__":
    sys.exit(_worker_main())
