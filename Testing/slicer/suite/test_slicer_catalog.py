"""Model catalogue and terminology: what the panel lists and the names it recognises."""
import shutil

from SegmentMBTFESlicer import catalog, panel
from SegmentMBTFELib.io.terminology import terminology_for


def test_terminology_for_known_and_unknown_names():
    assert "SCT^10200004^Liver~^^" in terminology_for("Liver")
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in terminology_for("kidney_left")
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in terminology_for("rightKidney")
    assert "^Hippocampus~SCT^255551008^Posterior" in terminology_for("posterior", "Dataset004_Hippocampus")
    assert "Neoplasm" in terminology_for("cancer", "Dataset003_Liver")  # not "Liver" from the dataset name
    assert terminology_for("edema", "Dataset004_Hippocampus") is None
    assert terminology_for("label 7") is None


def test_catalog_describes_model_folders_and_problems(hippo3d_model, tmp_path):
    dataset = tmp_path / "Dataset901_Hippocampus"
    shutil.copytree(hippo3d_model, dataset / hippo3d_model.name)
    info = catalog.describe(dataset)  # the dataset folder above the trained one works too
    assert (info.name, info.channels, info.labels, info.folds, info.modality) == \
        ("Dataset901_Hippocampus (3d_fullres)", ["MRI"], ["anterior", "posterior"], ["0"], "MR")
    untrained = tmp_path / "untrained"
    shutil.copytree(hippo3d_model, untrained, ignore=shutil.ignore_patterns("fold_*"))
    assert "has no trained fold" in catalog.describe(untrained).problem
    (tmp_path / "empty").mkdir()
    assert "No trained nnU-Net model in" in catalog.describe(tmp_path / "empty").problem
    broken = tmp_path / "broken"
    shutil.copytree(hippo3d_model, broken)
    (broken / "dataset.json").write_text("{not json")
    assert "dataset.json is not valid JSON" in catalog.describe(broken).problem


def test_modality_from_channel_names():
    assert catalog.modality(["CT"]) == "CT"
    assert catalog.modality(["T1", "T1ce", "T2", "FLAIR"]) == "MR"
    assert catalog.modality(["noNorm", "MRI"]) == "noNorm, MRI"


def test_channel_volumes_are_guessed_by_name():
    names = ["case1_flair", "case1_t1", "case1_t2"]
    assert panel.guess_volume("T2", names, 2) == 2
    assert panel.guess_volume("T1", names, 1) == 1
    assert panel.guess_volume("MRI", ["scan"], 0) == 0 and panel.guess_volume("ADC", ["scan"], 1) is None
