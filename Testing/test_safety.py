"""Every case of the safety catalogue (safety_catalogue.py) through the real command line, and the README table.

Generic cases run `segment-mbtfe` in this process (or as a subprocess where a command prefix makes a folder
read-only or a disk full, or where a traceback would only show there) and are checked one way: a refusal is
exactly the catalogue's line on stderr, exit code 1, no traceback, every watched folder unchanged; a result is
exit code 0, the output complete, no temporary file beside it, and the case's own checks. The cases that need
several commands or processes (signals while writing, concurrent fine-tunes and version switches, a killed
fine-tune, a batch with broken cases) are defined below and registered in the catalogue by name.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import model_factory
from engine_command import cli_command
import safety_catalogue as catalogue
from hostile_files import copy_model, smooth_volume, write_dicom_series, write_image
from safety_catalogue import CASES, Context, Refused, Works, finetune_args, finetune_case_files
from terminal import interrupt_when
from SegmentMBTFELib import cli, load_model
from SegmentMBTFELib.models.versions import ModelVersions, resolve

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def snapshot(path: Path) -> dict:
    """Everything that identifies a folder's contents (hidden files included), or a file's bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                             p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def the_one_line(code: int, err: str) -> str:
    assert code == cli.EXIT_ERROR, f"expected exit code 1, got {code}: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert "unexpected failure" not in lines[0], f"a bad input reached the bug handler: {lines[0]}"
    return lines[0]


# ----------------------------------------------------------------------------------------------- fixtures
# (models and good_image: conftest.py)

@pytest.fixture
def ctx(tmp_path, models, good_image, monkeypatch, capsys) -> Context:
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(home))

    def run(args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        stdout, stderr = capsys.readouterr()
        return code, stdout, stderr

    def run_process(args, prefix=None, timeout=240):
        result = subprocess.run((prefix or []) + cli_command() + [str(a) for a in args], capture_output=True,
                                text=True, timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    return Context(tmp_path, models, good_image, out, home, run, run_process, {"external": EXTERNAL})


# ------------------------------------------------------------------------------------------- the catalogue

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_case(case, ctx):
    if case.custom:
        case.make(ctx)
        if isinstance(case.outcome, Refused):
            code, err = ctx.extra["result"]
            line = the_one_line(code, err)
            assert case.outcome.matches(line), f"\n  got:      {line}\n  expected: {case.outcome.line}"
        return
    attempt = case.make(ctx)
    watched = [ctx.out, *attempt.kept]
    before = [snapshot(p) for p in watched]
    run = ctx.run_process if case.process or attempt.prefix is not None else ctx.run
    code, out, err = run(attempt.args, prefix=attempt.prefix) if run is ctx.run_process else run(attempt.args)
    if isinstance(case.outcome, Refused):
        line = the_one_line(code, err)
        assert case.outcome.matches(line), f"\n  got:      {line}\n  expected: {case.outcome.line}"
        assert [snapshot(p) for p in watched] == before, "a refused run changed what it was given or wrote output"
        if attempt.check:
            attempt.check()
        return
    assert code == 0, err
    assert "Traceback" not in err, err
    assert attempt.output is not None and attempt.output.is_file(), out + err
    assert not [p.name for p in attempt.output.parent.iterdir() if ".partial" in p.name], "a temporary file was left"
    notes = [line for line in err.splitlines() if line.strip()]
    if case.outcome.note:
        assert any(case.outcome.matches(line) for line in notes), f"\n  got: {notes}\n  expected: {case.outcome.note}"
    else:
        assert notes == [], f"unexpected lines on stderr: {notes}"
    if attempt.check:
        attempt.check()


def test_the_catalogue_has_at_least_forty_cases_beyond_the_first_eleven():
    assert len(CASES) >= 51
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_readme_safety_table_is_generated_from_the_catalogue():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert catalogue.TABLE_START in readme and catalogue.TABLE_END in readme
    assert catalogue.readme_with_table(readme) == readme, \
        "README.md's Safety table differs from the catalogue: run `python scripts/safety_table.py`"


def test_outcome_templates_match_what_varies_only():
    refused = Refused("error: Image not found: …nowhere.nii.gz.")
    assert refused.matches("error: Image not found: /tmp/x/nowhere.nii.gz.")
    assert not refused.matches("error: Image not found: /tmp/x/nowhere.nii.gz. And more")
    assert not refused.matches("error: Image not readable: /tmp/x/nowhere.nii.gz.")
    assert Works("x", "note: …").matches("note: anything")


# ------------------------------------------------------------------------------ signals while writing

def _signal_while_writing(ctx: Context, sig, exit_code: int):
    """Several runs, each sent `sig` at another moment after the export began: each one either stopped with
    nothing written, or finished with complete outputs; never a partial or temporary file."""
    # fine voxels: one tile at the model's 1 mm, then large outputs (probabilities too) on the image's grid
    image = write_image(ctx.tmp / "large.nrrd", smooth_volume((80, 88, 80)), spacing=(0.25, 0.25, 0.25))
    delays = [0.0, 0.05, 0.15, 0.35]  # after "done": the outputs take about 0.3 s to write
    outcomes = [None] * len(delays)

    def one(i):
        out = ctx.tmp / f"out{i}"
        out.mkdir()
        command = cli_command() + ["predict", "--no-tta", "--probabilities", "-m", str(ctx.models["one"]),
                                   "-i", str(image), "-o", str(out / "seg.seg.nrrd")]
        outcomes[i] = (out, *interrupt_when(command, b"done", sig=sig, delay=delays[i]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(delays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stopped = 0
    for out, code, text in outcomes:
        assert "Traceback" not in text, text
        names = sorted(p.name for p in out.iterdir())
        if code == exit_code:
            stopped += 1
            assert names == [], f"stopped while writing, it left {names}"
        else:
            assert code == 0, text
            assert names == ["seg.npz", "seg.seg.nrrd"], names
            with np.load(out / "seg.npz") as npz:
                assert npz["probabilities"].shape == (3, 80, 88, 80)
            assert sitk.ReadImage(str(out / "seg.seg.nrrd")).GetSize() == (80, 88, 80)
    assert stopped >= 1, "no run was stopped: the signals all came too late to test anything"


# ------------------------------------------------------------------------------------- versions at once

def _concurrent_finetunes(ctx: Context):
    model = copy_model(ctx.models["one"], ctx.tmp)
    image, labels = finetune_case_files(ctx)
    command = cli_command() + [str(a) for a in finetune_args(model, image, labels, "--iterations", "3")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    written = sorted(re.search(r"Wrote (v\d+) of", out).group(1) for out, _ in outputs)
    assert written == ["v1", "v2"], outputs
    versions = ModelVersions(model).list()
    assert [v.id for v in versions] == ["original", "v1", "v2"]
    assert all(not v.problem for v in versions), [v.summary() for v in versions]
    assert ModelVersions(model).current().id in {"v1", "v2"}
    for version in versions[1:]:
        load_model(resolve(model, version.id)[0])


SWITCHER = """
import random, sys
from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.models.versions import ModelVersions
model, rng = sys.argv[1], random.Random(int(sys.argv[2]))
for _ in range(40):
    versions = ModelVersions(model)
    try:
        if rng.random() < 0.7:
            versions.use(rng.choice(["original", "v1", "v2"]))
        else:
            versions.rollback()
    except ModelError as error:
        if "already at its original" not in str(error):
            raise
"""
ADDER = """
import sys
import model_factory
for shift in (0.03, 0.04):
    model_factory.perturbed_version(sys.argv[1], shift)
"""


def _concurrent_version_switching(ctx: Context):
    model = copy_model(ctx.models["one"], ctx.tmp)
    model_factory.perturbed_version(model, 0.01)
    model_factory.perturbed_version(model, 0.02)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "Testing"), os.environ.get("PYTHONPATH", "")]))
    commands = [[sys.executable, "-c", SWITCHER, str(model), str(seed)] for seed in range(3)]
    commands.append([sys.executable, "-c", ADDER, str(model)])
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for c in commands]
    for process in processes:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
    versions = ModelVersions(model)
    listed = versions.list()
    assert [v.id for v in listed] == ["original", "v1", "v2", "v3", "v4"]
    assert all(not v.problem for v in listed), [v.summary() for v in listed]
    assert json.loads(versions.registry_path.read_text())["current"] in {v.id for v in listed}
    assert not (versions.family_dir / ".lock").exists()


def _killed_finetune(ctx: Context):
    """SIGKILL during training and at moments while the version is written; after each, every listed
    version loads and nothing half-written is visible; then a fine-tune runs to the end."""
    model = copy_model(ctx.models["one"], ctx.tmp)
    image, labels = finetune_case_files(ctx)
    kills = [("200", b"iteration", 0.1), ("2", b"writing the new version", 0.0), ("2", b"writing the new version", 0.02)]
    for iterations, marker, delay in kills:
        command = cli_command() + [str(a) for a in finetune_args(model, image, labels, "--iterations", iterations)]
        command.remove("-q")  # the progress bar shows the stage the kill waits for
        code, text = interrupt_when(command, marker, sig=signal.SIGKILL, delay=delay, timeout=120)
        assert code in (-signal.SIGKILL, 0), text
        _assert_no_damage(model)
    code, out, err = ctx.run_process(finetune_args(model, image, labels, "--iterations", "1"), timeout=120)
    assert code == 0, err
    versions = ModelVersions(model)
    _assert_no_damage(model)
    assert not [p.name for p in versions.family_dir.iterdir() if ".partial-" in p.name], "leftovers not cleared"


def _assert_no_damage(model: Path):
    versions = ModelVersions(model)
    listed = versions.list()
    assert all(not v.problem for v in listed), [v.summary() for v in listed]
    folder, current = resolve(model)
    load_model(folder)
    if versions.family_dir.is_dir():  # visible folders are complete, registered or not
        for child in versions.family_dir.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                assert (child / "version.json").is_file(), f"{child} is half-written"


# ------------------------------------------------------------------------------------------------ batch

def _batch_with_broken_cases(ctx: Context):
    cases = ctx.tmp / "cases"
    write_image(cases / "alpha.nii.gz", smooth_volume(seed=1))
    write_image(cases / "beta_0000.nii.gz", smooth_volume(seed=2))
    write_dicom_series(cases / "gamma", (smooth_volume((12, 24, 22), 3) * 2).astype(np.int16))
    damaged = write_image(cases / "damaged.nii.gz", smooth_volume(seed=4))
    damaged.write_bytes(damaged.read_bytes()[:300])
    write_image(cases / "flat.nii.gz", np.full((20, 24, 22), 5, np.int16))
    (cases / "words.nii.gz").write_text("not an image")
    (cases / "empty").mkdir()
    (cases / "README.txt").write_text("notes about the archive")
    code, out, err = ctx.run(["predict", "-q", "--no-tta", "-m", ctx.models["one"], "-i", cases, "-o", ctx.out])
    assert code == cli.EXIT_ERROR, out + err
    assert sorted(p.name for p in ctx.out.iterdir()) == sorted(
        ["alpha.seg.nrrd", "beta.seg.nrrd", "gamma.seg.nrrd", "manifest.csv", "manifest.json"])
    manifest = {row["case"]: row for row in json.loads((ctx.out / "manifest.json").read_text())}
    reasons = {"damaged": "truncated or damaged", "flat": "no content", "words": "could not be read",
               "empty": "holds no DICOM series"}
    for name, words in reasons.items():
        assert manifest[name]["status"] == "failed" and words in manifest[name]["reason"], manifest[name]
        assert f"failed: {name}: {manifest[name]['reason']}" in out
        assert f"error: {name}: {manifest[name]['reason']}" in err
    for name in ("alpha", "beta", "gamma"):
        assert manifest[name]["status"] == "segmented" and manifest[name]["device"] == "cpu"
        assert set(manifest[name]["volumes_ml"]) == {"anterior", "posterior"}
    assert "3 segmented, 0 skipped (already done), 4 failed, of 7 case(s)" in out
    assert "left out 1 file(s) that are not images (e.g. README.txt)" in err
    written = {p.name: p.stat().st_mtime_ns for p in ctx.out.glob("*.seg.nrrd")}
    code, out, err = ctx.run(["predict", "-q", "--no-tta", "-m", ctx.models["one"], "-i", cases, "-o", ctx.out])
    assert code == cli.EXIT_ERROR and "0 segmented, 3 skipped (already done), 4 failed" in out
    assert {p.name: p.stat().st_mtime_ns for p in ctx.out.glob("*.seg.nrrd")} == written


EXTERNAL = {
    "sigint_while_writing": lambda ctx: _signal_while_writing(ctx, signal.SIGINT, cli.EXIT_CANCELLED),
    "sigterm_while_writing": lambda ctx: _signal_while_writing(ctx, signal.SIGTERM, cli.EXIT_TERMINATED),
    "concurrent_finetunes": _concurrent_finetunes,
    "concurrent_version_switching": _concurrent_version_switching,
    "killed_finetune": _killed_finetune,
    "batch_with_broken_cases": _batch_with_broken_cases,
}


def test_every_external_case_has_a_body():
    registered = {c.name for c in CASES if c.custom} - {"disk_full"}
    assert registered == set(EXTERNAL)
    assert all(isinstance(c.outcome, (Refused, Works)) for c in CASES)
