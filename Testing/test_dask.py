"""`segment-mbtfe predict -i CASES -o OUT --dask ADDRESS` on a real Dask distributed cluster (distribute.py).

A LocalCluster of 2 worker processes with 1 thread each stands in for a cluster's scheduler and workers: one
case per task, the model loaded once per worker process, the outputs written by the workers into the output
folder (a filesystem they share), the broken case failing alone, one manifest, and a second run that sends
no task at all because every output is there. Without the distributed package, one sentence says what to install.
"""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from hostile_files import smooth_volume, write_image
from SegmentMBTFELib import cli, load_model
from SegmentMBTFELib.batch.distribute import DASK_INSTALL, worker_counts
from SegmentMBTFELib.io.images import read_volume

distributed = pytest.importorskip("distributed", reason="the distributed package is not installed "
                                                         "(Testing/requirements.txt)")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as local, distributed.Client(local) as client:
        yield local.scheduler_address, client


def run(capsys, *args):
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_case_per_task_with_a_broken_case_and_a_rerun(cluster, models, tmp_path, capsys):
    address, client = cluster
    folder, out = tmp_path / "cases", tmp_path / "out"
    for i in range(4):
        write_image(folder / f"case{i}.nii.gz", smooth_volume(seed=i), spacing=(1.0, 1.5, 2.0))
    (folder / "case1b.nii.gz").write_bytes((folder / "case1.nii.gz").read_bytes()[:300])  # cut short

    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--dask", address)
    assert code == cli.EXIT_ERROR
    reason = "case1b.nii.gz is truncated or damaged: it holds less voxel data than its header describes."
    assert err.strip() == f"error: case1b: {reason}"
    assert "4 segmented, 0 skipped (already done), 1 failed, of 5 case(s)" in stdout
    with open(out / "manifest.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [(r["case"], r["status"]) for r in rows] == [("case0", "segmented"), ("case1", "segmented"),
                                                        ("case1b", "failed"), ("case2", "segmented"),
                                                        ("case3", "segmented")]
    assert rows[2]["reason"] == reason and not (out / "case1b.seg.nrrd").exists()
    # written by the workers, as the model in this process would have segmented them
    workers = {note for r in json.loads((out / "manifest.json").read_text()) for note in r["notes"]}
    assert workers <= {f"Dask worker {a}" for a in client.scheduler_info()["workers"]} and workers
    model = load_model(models["one"])
    for i in (0, 3):
        expected = model.predict([read_volume(folder / f"case{i}.nii.gz")], tta=False).labels.array
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case{i}.seg.nrrd"))), expected)
    # the model loaded once per worker process, whatever the number of cases it segmented
    counts = client.run(worker_counts).values()
    assert [c["model loads"] for c in counts] == [1, 1] and sum(c["cases"] for c in counts) == 5

    # a rerun sends only the case that failed: the others' outputs are there
    code, stdout, err = run(capsys, "predict", "-q", "--no-tta", "-m", models["one"], "-i", folder, "-o", out,
                            "--dask", address)
    assert code == cli.EXIT_ERROR and "0 segmented, 4 skipped (already done), 1 failed" in stdout
    counts = client.run(worker_counts).values()
    assert sum(c["cases"] for c in counts) == 6 and sum(c["model loads"] for c in counts) == 2


def test_without_distributed_one_sentence_says_how_to_install_it(models, good_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as on a machine without the [dask] extra
    code, _, err = run(capsys, "predict", "-q", "-m", models["one"], "-i", good_image, "-o", tmp_path / "out",
                       "--dask", "tcp://127.0.0.1:8786")
    assert code == cli.EXIT_ERROR and err.strip() == f"error: {DASK_INSTALL}"
