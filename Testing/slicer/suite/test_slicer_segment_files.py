"""The console's segmentFiles with a broken case among good ones, through the worker process as in Slicer.

The batch does not stop at the broken case: the good cases are written, the broken one is reported with the
very reason the command line's batch gives for it (its manifest), and the call raises SomeCasesFailed
saying so, with the files written and each failed case in its attributes; the scene is not touched.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from slicer_testing import scene_state

pytestmark = pytest.mark.timeout(300)


def test_a_broken_case_fails_alone_with_the_command_lines_reason(module, scene, tiny_model, hippo_test_cases,
                                                                 tmp_path, caplog):
    from SegmentMBTFELib.errors import SomeCasesFailed
    cases = tmp_path / "cases"
    cases.mkdir()
    good = [cases / f"good{i}.nii.gz" for i in (1, 2)]
    for target, case in zip(good, hippo_test_cases):
        target.write_bytes(case[0].read_bytes())
    broken = cases / "broken.nii.gz"
    broken.write_bytes(good[0].read_bytes()[:400])  # cut short, as a copy that stopped half-way
    before = scene_state(scene)

    with pytest.raises(SomeCasesFailed) as raised:
        module.SegmentMBTFELogic().segmentFiles([good[0], broken, good[1]], str(tiny_model), tmp_path / "out",
                                                tta=False)
    failed = raised.value
    assert sorted(Path(p).name for p in failed.written) == ["good1.seg.nrrd", "good2.seg.nrrd"]
    assert all(Path(p).is_file() for p in failed.written) and not (tmp_path / "out" / "broken.seg.nrrd").exists()
    assert [case for case, _ in failed.failed] == ["broken"]
    assert str(failed) == f"1 of 3 cases could not be segmented (the other 2 were written). broken: {failed.failed[0][1]}"
    assert any(r.levelname == "ERROR" and "broken was not segmented" in r.getMessage() for r in caplog.records)
    assert scene_state(scene) == before

    # the command line's batch says the same of that file
    command = [sys.executable, "-m", "SegmentMBTFELib", "predict", "-q", "--no-tta", "-m", str(tiny_model),
               "-i", str(cases), "-o", str(tmp_path / "cli")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr
    with open(tmp_path / "cli" / "manifest.csv", newline="", encoding="utf-8") as file:
        reasons = {row["case"]: row["reason"] for row in csv.DictReader(file)}
    assert reasons == {"broken": failed.failed[0][1], "good1": "", "good2": ""}
