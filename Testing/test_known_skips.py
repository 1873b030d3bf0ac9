"""The suite cannot pass by skipping: scripts/test.sh stops before pytest when the data or a reference package is
missing (scripts/check_test_setup.py), and no test skips unless Testing/known_skips.py names it for this machine
(test_only_the_known_tests_skip, which conftest.py runs last)."""
import shutil
import subprocess
import sys
from pathlib import Path

import known_skips

ROOT = Path(__file__).resolve().parents[1]
CHECK = "scripts/check_test_setup.py"


def check_in_a_clone(clone: Path, extra_requirement: str = "") -> subprocess.CompletedProcess:
    """The setup check run from a copy of the files it reads, in `clone`: ../shared/data is clone's neighbour."""
    for name in (CHECK, "Testing/nnunet_reference.py", "Testing/build_lock.py", "Testing/requirements.txt"):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, clone / name)
    with open(clone / "Testing" / "requirements.txt", "a") as requirements:
        requirements.write(extra_requirement)
    return subprocess.run([sys.executable, str(clone / CHECK)], capture_output=True, text=True, timeout=120)


def test_the_setup_check_passes_here():
    done = subprocess.run([sys.executable, str(ROOT / CHECK)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_the_setup_check_stops_without_the_data(tmp_path):
    done = check_in_a_clone(tmp_path / "clone")
    assert done.returncode == 1
    assert done.stderr == (f"Cannot run the tests: missing the real test data at {tmp_path.resolve() / 'shared' / 'data'}"
                           " (../shared/data beside the repository).\n")


def test_the_setup_check_stops_without_a_reference_package(tmp_path):
    for folder in ("hippocampus", "formats"):  # what the check looks for in the data
        (tmp_path / "shared" / "data" / folder).mkdir(parents=True)
    done = check_in_a_clone(tmp_path / "clone", "no-such-reference-package>=1\n")
    assert done.returncode == 1
    assert done.stderr == ("Cannot run the tests: missing the package no-such-reference-package "
                           "(scripts/setup-venv.sh --test installs it).\n")


def test_only_the_known_tests_skip():
    assert not known_skips.stale(), f"Testing/known_skips.py names tests that do not exist: {known_skips.stale()}"
    expected = known_skips.expected_here()
    unknown = {node: reason for node, reason in known_skips.SKIPPED.items() if node not in expected}
    assert not unknown, "tests skipped that Testing/known_skips.py does not name for this machine (a missing " \
        "package or ../shared/data, or a new skip to name there with why):\n" + \
        "\n".join(f"  {node}: {reason}" for node, reason in sorted(unknown.items()))
    ran = sorted(expected - known_skips.SKIPPED.keys())
    assert not ran, "tests Testing/known_skips.py names as skipping here ran: remove or correct their entries:\n" + \
        "\n".join(f"  {node}" for node in ran)
