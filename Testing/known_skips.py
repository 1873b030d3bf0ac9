"""The tests allowed to skip, each with why, and the check that no other test skipped (test_known_skips.py).

A skipped test passes silently: without ../shared/data or a reference package most of the suite would skip and
the run still succeed. So every skip is named here, with the machines it applies to; conftest.py records the
session's skips and test_known_skips.py, run last, fails when a test skipped that is not named for this machine,
or a test named for this machine ran instead (the list is stale). A new skip is a failure until it is named.
"""
from __future__ import annotations

import os
import sys


def _gpu() -> bool:
    import torch  # only when checked: conftest imports this module, and nothing there needs torch
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _no_read_only_folder() -> bool:
    """hostile_files.read_only_prefix has no way to make a folder read-only here."""
    import hostile_files
    return not hostile_files.UNSHARE and not (hasattr(os, "geteuid") and os.geteuid() != 0)


ALWAYS = "always", lambda: True
GPU = "on a machine with a CUDA or MPS GPU", _gpu
WINDOWS = "on Windows", lambda: sys.platform == "win32"
NOT_LINUX = "outside Linux", lambda: not sys.platform.startswith("linux")
NO_READ_ONLY = "as root (or on Windows) without unprivileged mount namespaces", _no_read_only_folder

CONSOLE = "Testing/slicer/suite/test_slicer_safety.py::test_catalogue_case_through_the_console"
SAFETY = "Testing/test_safety.py::test_catalogue_case"
READ_ONLY = ("the case needs a folder the test cannot write to: root writes through permission bits, so only a "
             "read-only mount in a private namespace (unshare) makes one")
COMMAND_LINE_ONLY = ("the safety case gives the command line's own options (-f, -c, --series, --previous-stage), "
                     "which the Slicer console's call does not have; test_safety.py runs it")

# test node id -> (when it skips, why that is right)
KNOWN = {
    f"{CONSOLE}[missing_fold]": (ALWAYS, COMMAND_LINE_ONLY),
    f"{CONSOLE}[unknown_configuration]": (ALWAYS, COMMAND_LINE_ONLY),
    f"{CONSOLE}[dicom_series_chosen]": (ALWAYS, COMMAND_LINE_ONLY),
    f"{CONSOLE}[dicom_series_missing]": (ALWAYS, COMMAND_LINE_ONLY),
    f"{CONSOLE}[cascade_previous_stage_other_grid]": (ALWAYS, COMMAND_LINE_ONLY),
    f"{CONSOLE}[many_labels]": (ALWAYS, "the case first runs the command line itself (its NIfTI output's uint16 "
                                        "labels), which the console cannot; test_safety.py runs it"),
    "Testing/test_engine_units.py::test_choose_device": (
        GPU, "what `auto` picks on a machine without a GPU (the CPU) cannot be checked where a GPU is"),
    "Testing/test_bad_input.py::test_ctrl_c_on_the_command_line_leaves_no_output": (
        WINDOWS, "Ctrl+C is sent as SIGINT through a pseudo-terminal, which Windows does not have"),
    "Testing/test_cli_finetune.py::test_ctrl_c_during_finetune_writes_nothing": (
        WINDOWS, "Ctrl+C is sent as SIGINT through a pseudo-terminal, which Windows does not have"),
    "Testing/test_batch.py::test_ctrl_c_part_way_keeps_the_finished_cases_and_their_manifest": (
        WINDOWS, "Ctrl+C is sent as SIGINT through a pseudo-terminal, which Windows does not have"),
    "Testing/test_imageio.py::test_disk_full_leaves_no_file": (
        WINDOWS, "a full disk is made with a POSIX file size limit (SIGXFSZ), which Windows does not have"),
    "Testing/test_cpu_inference.py::test_the_heap_reuses_tile_sized_memory_within_the_block_and_gives_it_back_after": (
        NOT_LINUX, "it measures glibc's malloc, which only Linux has"),
    f"{SAFETY}[read_only_output_folder]": (NO_READ_ONLY, READ_ONLY),
    f"{SAFETY}[read_only_versions_home]": (NO_READ_ONLY, READ_ONLY),
    f"{SAFETY}[read_only_versions_home_predict]": (NO_READ_ONLY, READ_ONLY),
}

# What this session collected (NAMED before deselection), ran and skipped, filled in by conftest.py's hooks.
NAMED: set = set()
COLLECTED: set = set()
SKIPPED: dict = {}  # node id -> the reason pytest gave


def record(report) -> None:
    """conftest.py's pytest_runtest_logreport: a skip in any phase (a fixture's skip is in the setup)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        SKIPPED[report.nodeid] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def expected_here() -> set:
    """The node ids that must skip on this machine, among those collected."""
    return {node for node, ((_, applies), _) in KNOWN.items() if node in COLLECTED and applies()}


def stale() -> list:
    """Node ids named here that are not tests of the files collected (renamed or removed tests)."""
    files = {node.split("::")[0] for node in NAMED}
    return sorted(node for node in KNOWN if node.split("::")[0] in files and node not in NAMED)
