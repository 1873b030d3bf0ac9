"""One reference build at a time per cache folder, across processes.

scripts/test.sh builds the reference models ahead (Testing/build_references.py), on the core the test session
leaves idle, into the folder the session reads ($SEGMENTMBTFE_REFERENCE_CACHE). A test that needs a model being
built waits for that build instead of starting its own beside it: the kinds of one dataset share its raw, planned
and preprocessed data, and nnU-Net writes a dataset's splits on its first training. A model already built is
returned without waiting (`build_once` checks its record before taking the lock, and again after).
"""
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

# lock file -> how deep this process is inside it: a build that asks for another build inside it (none does today:
# derived kinds build their base first) goes on instead of waiting for itself
_depth = {}


def build_once(root, record: Path, request: dict, build: Callable[[], Optional[dict]],
               exists: Callable[[], bool]) -> None:
    """Run `build` unless `record` says it ran for `request` and `exists()`: one build at a time per root, across
    processes, and none again when another process made it while this one waited. The record keeps the request,
    the build's seconds and what `build` returns (a build id...)."""
    def built() -> bool:
        return exists() and record.is_file() and json.loads(record.read_text()).get("request") == request
    if built():
        return
    with one_build_at_a_time(root):
        if built():
            return
        started = time.perf_counter()
        made = build() or {}
        write_record(record, {"request": request, "seconds": time.perf_counter() - started, **made})


@contextmanager
def one_build_at_a_time(root):
    path = Path(root).resolve() / "build.lock"
    if _depth.get(path):
        _depth[path] += 1
        try:
            yield
        finally:
            _depth[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)   # released when the file closes, also when this process dies
        _depth[path] = 1
        try:
            yield
        finally:
            _depth[path] = 0


def write_record(path: Path, value) -> None:
    """A build's record, whole or not at all: another process may read it at any moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)
