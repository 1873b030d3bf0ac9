"""build_lock.py, which lets scripts/test.sh build the reference models ahead beside the tests: builds in two
processes never overlap, a model is built once however many processes ask for it, a build inside a build does not
wait for itself, and a record is never seen half-written."""
import json
import subprocess
import sys
import time
from pathlib import Path

from build_lock import build_once, one_build_at_a_time, write_record

HERE = Path(__file__).resolve().parent
BUILDER = """
import sys, time
sys.path.insert(0, {here!r})
from build_lock import one_build_at_a_time
with one_build_at_a_time({root!r}):
    with one_build_at_a_time({root!r}):      # a build asking for another inside it
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


ASKER = """
import sys, time
sys.path.insert(0, {here!r})
from pathlib import Path
from build_lock import build_once
root = Path({root!r})

def build():
    with open(root / "builds.txt", "a") as builds:
        builds.write("built\\n")
    time.sleep(0.3)
    return {{"build_id": "x"}}
build_once(root, root / "records" / "kind.json", {{"kind": "hippo3d"}}, build, lambda: True)
"""


def test_a_model_asked_for_by_three_processes_is_built_once(tmp_path):
    askers = [subprocess.Popen([sys.executable, "-c", ASKER.format(here=str(HERE), root=str(tmp_path))])
              for _ in range(3)]
    assert [asker.wait(timeout=60) for asker in askers] == [0, 0, 0]
    assert (tmp_path / "builds.txt").read_text() == "built\n"
    record = json.loads((tmp_path / "records" / "kind.json").read_text())
    assert record["request"] == {"kind": "hippo3d"} and record["build_id"] == "x" and record["seconds"] >= 0.3
    built = []
    build_once(tmp_path, tmp_path / "records" / "kind.json", {"kind": "hippo3d"}, lambda: built.append(1),
               lambda: False)  # the record matches, but what it built is gone: built again
    build_once(tmp_path, tmp_path / "records" / "kind.json", {"kind": "hippo2d"}, lambda: built.append(2),
               lambda: True)   # another request
    assert built == [1, 2]


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
