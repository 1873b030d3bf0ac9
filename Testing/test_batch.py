"""A folder of cases through `segment-mbtfe predict -i CASES -o OUTPUT_DIR` (batch.py).

Checked on real files: how cases are found (one file per case, nnU-Net's channel files, DICOM series folders,
patient numbers that look like channel numbers), skipping finished outputs and --overwrite, a damaged
earlier output segmented again, --parts/--part covering every case once, the manifest's columns and segment
volumes, Ctrl+C part-way (the manifest lists what was finished), and the one line when nothing is found.
(The catalogue's batch_with_broken_cases, in test_safety.py, checks a batch where some cases are broken.)
The stages side by side (overlap.py): one case ahead and one behind at most, the sequential run's outputs,
cancel in the network. Worker processes (distribute.py): two CPU processes standing in for two GPUs, one
manifest, a rerun. (test_dask.py: the same on a Dask cluster.)
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hostile_files import smooth_volume, write_dicom_series, write_image
from terminal import interrupt_when
from SegmentMBTFELib import cli
from SegmentMBTFELib.batch.cases import find_cases

pytestmark = pytest.mark.timeout(300)


def run(capsys, *args):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cases_folder(tmp_path: Path, count: int = 4) -> Path:
    folder = tmp_path / "cases"
    for i in range(count):
        write_image(folder / f"case{i}.nii.gz", smooth_volume(seed=i), spacing=(1.0, 1.5, 2.0))
    return folder


def manifest_rows(folder: Path, stem="manifest") -> list:
    with open(folder / f"{stem}.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_finding_cases_in_the_ways_archives_hold_them(tmp_path):
    folder = tmp_path / "archive"
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nrrd", "b_0001.nrrd", "c_0000.mha", "d_0001.nii.gz",
                 "e_0000.nii.gz", "e_0001.nii.gz", "e_0002.nii.gz", "patient_0007.nii.gz", ".hidden_0000.nii.gz",
                 "old.seg.nrrd", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    (folder / "series").mkdir()
    cases, ignored = find_cases([folder], ["T1", "T2"])
    found = {c.name: ([p.name for p in c.inputs], c.problem) for c in cases}
    assert found["a"] == (["a_0000.nii.gz", "a_0001.nii.gz"], "")
    assert found["b"] == (["b_0000.nrrd", "b_0001.nrrd"], "")
    assert "c_0001 (T2) is missing" in found["c"][1]
    assert "c" in found and "d_0000 (T1) is missing" in found["d"][1]
    assert "channel 0002 file but the model takes 2 channel(s)" in found["e"][1]
    assert "needs 2 channels" in found["series"][1]
    assert sorted(p.name for p in ignored) == ["notes.txt", "old.seg.nrrd"]
    assert ".hidden" not in " ".join(found)

    # with one channel, a 4-digit number other than 0000 is part of the case's name (a patient number)
    cases, _ = find_cases([folder / "patient_0007.nii.gz", folder / "e_0000.nii.gz"], ["CT"])
    assert [(c.name, c.problem) for c in cases] == [("e", ""), ("patient_0007", "")]


def test_a_folder_of_cases_then_a_rerun_skips_them_and_overwrite_redoes_them(models, tmp_path, capsys):
    folder, out = cases_folder(tmp_path, 3), tmp_path / "out"
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--format", ".nii.gz")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz",
                                                      "manifest.csv", "manifest.json"]
    assert "3 segmented, 0 skipped (already done), 0 failed, of 3 case(s)" in stdout and err == ""
    rows = manifest_rows(out)
    assert [r["status"] for r in rows] == ["segmented"] * 3 and all(r["device"] == "cpu" for r in rows)
    assert list(rows[0]) == ["case", "status", "reason", "seconds", "device", "inputs", "output", "notes",
                             "anterior (mL)", "posterior (mL)"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case1.nii.gz")))
    voxel_ml = 1.0 * 1.5 * 2.0 / 1000
    for value, name in ((1, "anterior"), (2, "posterior")):
        assert float(rows[1][f"{name} (mL)"]) == pytest.approx(np.count_nonzero(labels == value) * voxel_ml, rel=1e-5)
    assert json.loads((out / "manifest.json").read_text())[1]["volumes_ml"]["posterior"] == \
        pytest.approx(np.count_nonzero(labels == 2) * voxel_ml, rel=1e-5)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("case*")}
    (out / "case2.nii.gz").write_bytes(b"damaged by a crash of another tool")
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--format", ".nii.gz")
    assert code == 0, err
    assert "1 segmented, 2 skipped (already done)" in stdout
    assert [r["status"] for r in manifest_rows(out)] == ["skipped", "skipped", "segmented"]
    assert manifest_rows(out)[0]["anterior (mL)"] == rows[0]["anterior (mL)"]  # volumes of skipped cases too
    assert {n: t for n, t in stamps.items() if n != "case2.nii.gz"} == \
        {p.name: p.stat().st_mtime_ns for p in out.glob("case*") if p.name != "case2.nii.gz"}
    sitk.ReadImage(str(out / "case2.nii.gz"))  # segmented again, readable

    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--format", ".nii.gz", "--overwrite")
    assert code == 0 and "3 segmented, 0 skipped" in stdout, err


def test_parts_cover_every_case_once(models, tmp_path, capsys):
    folder, out = cases_folder(tmp_path, 5), tmp_path / "out"
    for part in (1, 2, 3):
        code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                                "--parts", 3, "--part", part)
        assert code == 0, err
    names = [r["case"] for part in (1, 2, 3) for r in manifest_rows(out, f"manifest.part{part}of3")]
    assert sorted(names) == [f"case{i}" for i in range(5)]
    assert len({p.name for p in out.glob("*.seg.nrrd")}) == 5
    code, _, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", folder, "-o", out, "--parts", 3,
                       "--part", 4)
    assert code == cli.EXIT_ERROR and err.strip() == "error: --part must be between 1 and --parts (3); got 4."


def test_channel_files_and_dicom_folders(models, tmp_path, capsys):
    folder, out = tmp_path / "cases", tmp_path / "out"
    for channel in (0, 1):
        write_image(folder / f"mr_{channel:04d}.nii.gz", smooth_volume(seed=channel))
    write_image(folder / "half_0000.nii.gz", smooth_volume(seed=5))
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["two"], "-i", folder, "-o", out)
    assert code == cli.EXIT_ERROR
    assert err.strip() == "error: half: The channel file half_0001 (T2) is missing."
    assert (out / "mr.seg.nrrd").is_file() and not (out / "half.seg.nrrd").exists()

    dicom = tmp_path / "dicom"
    for name in ("ct_a", "ct_b"):
        write_dicom_series(dicom / name, (smooth_volume((10, 24, 22)) * 2).astype(np.int16))
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", dicom, "-o", out)
    assert code == 0, err
    assert (out / "ct_a.seg.nrrd").is_file() and (out / "ct_b.seg.nrrd").is_file()
    # a DICOM series folder given as -i is one case
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", dicom / "ct_a",
                            "-o", tmp_path / "single")
    assert code == 0 and (tmp_path / "single" / "ct_a.seg.nrrd").is_file(), err


def test_an_output_folder_inside_the_input_is_not_a_case(models, tmp_path, capsys):
    folder = cases_folder(tmp_path, 2)
    for _ in range(2):
        code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder,
                                "-o", folder / "segmentations")
        assert code == 0, err
    assert "0 segmented, 2 skipped (already done), 0 failed, of 2 case(s)" in stdout
    code, _, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", folder, "-o", folder)
    assert code == cli.EXIT_ERROR and "is the folder of the cases; give another one" in err


def test_no_cases_is_one_line(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", tmp_path / "empty", "-o", tmp_path / "o")
    assert code == cli.EXIT_ERROR and err.startswith("error: No cases found in ") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal and SIGINT")
def test_ctrl_c_part_way_keeps_the_finished_cases_and_their_manifest(models, tmp_path):
    folder, out = cases_folder(tmp_path, 3), tmp_path / "out"
    command = [str(Path(sys.executable).with_name("segment-mbtfe")), "predict", "-m", str(models["one"]),
               "-i", str(folder), "-o", str(out), "--step", "0.2"]
    code, text = interrupt_when(command, b"case1 (2/3): tile")
    assert code == cli.EXIT_CANCELLED, text
    assert "Traceback" not in text and "the cases finished before are kept" in text
    assert sorted(p.name for p in out.iterdir()) == ["case0.seg.nrrd", "manifest.csv", "manifest.json"]
    assert [(r["case"], r["status"]) for r in manifest_rows(out)] == [("case0", "segmented")]


# ------------------------------------------------------------------ stages side by side (overlap.py)

def test_the_pipeline_reads_one_ahead_and_writes_one_behind_and_keeps_the_order():
    """The real pipeline with stages that log when they run: case i+1 is read and case i-1 written while the
    network works on case i, never further ahead; without room, each case runs alone."""
    import threading
    import time
    from SegmentMBTFELib.batch.overlap import run_in_stages
    log, lock = [], threading.Lock()

    def stage(name, pause):
        def run(item):
            with lock:
                log.append(("start", name, item))
            time.sleep(pause)
            with lock:
                log.append(("end", name, item))
            return item
        return run

    def when(event, name, item):
        return log.index((event, name, item))
    done = []
    run_in_stages(list(range(4)), stage("read", 0.02), stage("network", 0.3), stage("write", 0.02), done.append)
    assert done == [0, 1, 2, 3]
    for i in (1, 2):
        assert when("start", "read", i + 1) < when("end", "network", i)       # read ahead, beside the network
        assert when("start", "write", i - 1) < when("end", "network", i)      # written behind, beside it
    for i in (0, 1):  # one ahead at most: case i+2 is read only once the network is done with case i
        assert when("start", "read", i + 2) > when("end", "network", i)

    log.clear()
    done.clear()
    run_in_stages(list(range(3)), stage("read", 0.01), stage("network", 0.05), stage("write", 0.01), done.append,
                  room=lambda item: False)
    assert done == [0, 1, 2]
    assert [(event, name) for event, name, _ in log] == [("start", "read"), ("end", "read"), ("start", "network"),
                                                         ("end", "network"), ("start", "write"), ("end", "write")] * 3


def test_overlapped_outputs_are_those_of_the_sequential_run(models, tmp_path):
    """Real files through run_batch both ways: the same label maps, the same manifest rows but the times,
    progress that never goes back, and every case's stages reported."""
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.batch.cases import BatchSettings, run_batch
    folder = cases_folder(tmp_path, 3)
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    cases, _ = find_cases([folder], ["CT"])
    model, runs = load_model(models["one"]), {}
    for overlap in (False, True):
        progress = []
        results = run_batch(model, None, cases, tmp_path / str(overlap),
                            BatchSettings(".nii.gz", tta=False, overlap=overlap),
                            progress=lambda fraction, text: progress.append((fraction, text)))
        runs[overlap] = [(r.case, r.status, r.reason, r.volumes_ml, r.notes) for r in results]
        fractions = [f for f, _ in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        for i in range(3):
            assert any(text == f"case{i} ({i + 2}/4): preprocessing" for _, text in progress)
            assert any(text == f"case{i} ({i + 2}/4): exporting" for _, text in progress)
    assert runs[True] == runs[False] and [r[1] for r in runs[True]] == ["failed"] + ["segmented"] * 3
    for i in range(3):
        one, other = (sitk.ReadImage(str(tmp_path / str(o) / f"case{i}.nii.gz")) for o in (False, True))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(other))


def test_cancel_in_the_network_writes_the_case_before_and_not_the_one_read_ahead(models, tmp_path):
    import threading
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.batch.cases import BatchSettings, Manifest, run_batch
    from SegmentMBTFELib.errors import Cancelled
    cases, _ = find_cases([cases_folder(tmp_path, 4)], ["CT"])
    out, cancel = tmp_path / "out", threading.Event()
    out.mkdir()

    def cancel_in_case2(fraction, text):
        if text.startswith("case2 (3/4): tile"):
            cancel.set()
    with pytest.raises(Cancelled):
        run_batch(load_model(models["one"]), None, cases, out, BatchSettings(tta=False, overlap=True),
                  Manifest(out, ["anterior", "posterior"]), progress=cancel_in_case2, cancel=cancel)
    assert sorted(p.name for p in out.iterdir()) == ["case0.seg.nrrd", "case1.seg.nrrd", "manifest.csv",
                                                     "manifest.json"]
    assert [(r["case"], r["status"]) for r in manifest_rows(out)] == [("case0", "segmented"), ("case1", "segmented")]


# -------------------------------------------------------------- one worker process per device (distribute.py)

def test_two_worker_processes_share_the_cases_and_write_one_manifest(models, tmp_path, capsys):
    """--devices cpu,cpu: the very machinery that runs one process per GPU (cuda:0,cuda:1), with two CPU
    processes; each case's manifest row says which worker segmented it."""
    folder, out = cases_folder(tmp_path, 4), tmp_path / "out"
    (folder / "case1b.nii.gz").write_bytes(b"not an image")
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--devices", "cpu,cpu", "--format", ".nii.gz")
    assert code == cli.EXIT_ERROR and err.strip().startswith("error: case1b: case1b.nii.gz could not be read")
    assert "4 segmented, 0 skipped (already done), 1 failed, of 5 case(s)" in stdout
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.csv", "manifest.json"]
    rows = manifest_rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("case0", "segmented"), ("case1", "segmented"),
                                                        ("case1b", "failed"), ("case2", "segmented"),
                                                        ("case3", "segmented")]
    assert [r["notes"] for r in rows] == ["worker 1 of 2 (cpu)", "worker 2 of 2 (cpu)", "worker 1 of 2 (cpu)",
                                          "worker 2 of 2 (cpu)", "worker 1 of 2 (cpu)"]
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    model = load_model(models["one"])
    for i in (0, 1):  # one case of each worker: as this process segments it
        expected = model.predict([read_volume(folder / f"case{i}.nii.gz")], tta=False).labels.array
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case{i}.nii.gz"))), expected)

    code, stdout, _ = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                          "--workers", "2", "--format", ".nii.gz")
    assert code == cli.EXIT_ERROR and "0 segmented, 4 skipped (already done), 1 failed" in stdout


def test_a_worker_process_that_dies_fails_only_the_cases_it_had_left(models, tmp_path, capsys, monkeypatch):
    """The second of two worker processes is killed (SIGKILL, as the system's out-of-memory killer does) once it
    has segmented its first case: the first worker's cases are all written, the dead one's are failed, saying
    so, and the exit code is 1."""
    from SegmentMBTFELib.batch import distribute
    settle = distribute._PartProcess.settle

    def settle_then_kill(worker, reply):
        settled = settle(worker, reply)
        if worker.name.startswith("worker 2") and len(worker.done) == 1:
            worker.process.kill()
        return settled
    monkeypatch.setattr(distribute._PartProcess, "settle", settle_then_kill)
    folder, out = cases_folder(tmp_path, 6), tmp_path / "out"
    code, stdout, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", folder, "-o", out,
                            "--devices", "cpu,cpu", "--format", ".nii.gz")
    assert code == cli.EXIT_ERROR
    rows = {r["case"]: r for r in manifest_rows(out)}
    first, second = ["case0", "case2", "case4"], ["case1", "case3", "case5"]  # the parts: every other case
    assert all(rows[c]["status"] == "segmented" and (out / f"{c}.nii.gz").is_file() for c in first)
    assert rows["case1"]["status"] == "segmented"
    failed = [c for c in second if rows[c]["status"] == "failed"]
    assert failed, "the killed worker had segmented all its cases before it was killed: nothing was tested"
    for case in failed:
        assert rows[case]["reason"] == ("its worker 2 of 2 (cpu) ended (exit code -9) before segmenting it; "
                                        "rerun to segment it") and not (out / f"{case}.nii.gz").exists()


def test_worker_devices_are_checked_in_one_sentence(models, good_image, tmp_path, capsys):
    from SegmentMBTFELib.batch.distribute import worker_devices
    assert worker_devices("cpu", 3) == ["cpu"] * 3 and worker_devices("auto", None, "cpu,cpu") == ["cpu", "cpu"]
    assert worker_devices("auto") == [] and worker_devices("cpu", 1) == []  # no GPUs here: this process segments
    for option, line in ((["--workers", "0"], "error: --workers must be 1 or more; got 0."),
                         (["--devices", "cpu,cuda:1"], "error: CUDA was requested but this torch")):
        code, _, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", good_image.parent,
                           "-o", tmp_path / "o", *option)
        assert code == cli.EXIT_ERROR and err.startswith(line) and len(err.splitlines()) == 1
