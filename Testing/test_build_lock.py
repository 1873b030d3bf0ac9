"""build_lock.py, which lets scripts/test.sh build the reference models ahead beside the tests: builds in two
processes never overlap, a build inside a build (a derived kind's base) does not wait for itself, and a record is
never seen half-written."""
import json
import subprocess
import sys
import time
from pathlib import Path

from build_lock import one_build_at_a_time, write_record

HERE = Path(__file__).resolve().parent
BUILDER = """
import sys, time
sys.path.insert(0, {here!r})
from build_lock import one_build_at_a_time
with one_build_at_a_time({root!r}):
    with one_build_at_a_time({root!r}):      # a base kind built within the derived kind's build
        start = time.time()
        time.sleep(0.4)
        print(start, time.time())
"""


def test_two_processes_build_one_at_a_time(tmp_path):
    code = BUILDER.format(here=str(HERE), root=str(tmp_path))
    builders = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    spans = sorted(tuple(map(float, b.communicate(timeout=60)[0].split())) for b in builders)
    assert all(b.returncode == 0 for b in builders) and len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_a_build_waits_for_the_other_process_to_finish(tmp_path):
    code = BUILDER.format(here=str(HERE), root=str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # it holds the lock by now (it imports nothing heavy)
    with one_build_at_a_time(tmp_path):
        entered = time.time()
    _, other_end = map(float, other.communicate(timeout=60)[0].split())
    assert entered >= other_end


def test_a_record_is_whole_or_absent(tmp_path):
    record = tmp_path / "records" / "kind.json"
    write_record(record, {"request": {"kind": "hippo3d"}, "seconds": 1.5})
    assert json.loads(record.read_text()) == {"request": {"kind": "hippo3d"}, "seconds": 1.5}
    assert [p.name for p in record.parent.iterdir()] == ["kind.json"]  # no partial file left beside it
