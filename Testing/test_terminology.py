"""Terminology: our Slicer terminology context file (SegmentMBTFE.term.json), the entries terminology_for
makes from it, and .seg.nrrd files that carry them without being asked (the command line's output).

That Slicer itself loads the file and finds every entry in it is checked with Slicer's real terminology
logic in slicer/suite/test_slicer_segments.py.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import model_factory

from SegmentMBTFELib.io.segfile import read_seg_nrrd
from SegmentMBTFELib.io.terminology import TERMINOLOGY_FILE, context_name, terminology_for
from SegmentMBTFELib.io.writers import write_prediction
from SegmentMBTFELib.volume import Volume

# The schema Slicer's vtkSlicerTerminologiesModuleLogic::LoadTerminologyFromFile accepts for a terminology
# (TERMINOLOGY_CONTEXT_SCHEMA in Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.cxx).
SEGMENT_CONTEXT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
# Category, type and modifier codes as Slicer's DICOM master list gives them (Modules/Loadable/Terminologies/
# Resources/SegmentationCategoryTypeModifier-DICOM-Master.json); Anterior and Posterior are SNOMED CT's.
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
MASTER_LIST_TYPES = {
    "Hippocampus": "5366008", "Liver": "10200004", "Spleen": "78961009", "Kidney": "64033007",
    "Pancreas": "15776009", "Gallbladder": "28231008", "Stomach": "69695003", "Aorta": "15825003",
    "Inferior vena cava": "64131007", "Portal vein": "32764006", "Adrenal gland": "23451007",
    "Esophagus": "32849002", "Trachea": "44567001", "Heart": "80891009", "Brain": "12738006",
    "Duodenum": "38848004", "Colon": "71854001", "Small Intestine": "30315005", "Bladder": "89837001",
    "Prostate": "41216001", "Lung": "39607008", "Neoplasm": "108369006",
}
MODIFIERS = {"Left": "7771000", "Right": "24028007", "Anterior": "255549009", "Posterior": "255551008"}


def parts(entry: str):
    """(context, category, type, modifier) of a TerminologyEntry string, codes as (scheme, value, meaning)."""
    fields = entry.split("~")
    assert len(fields) == 7, entry  # what Slicer's DeserializeTerminologyEntry requires
    code = lambda text: tuple(text.split("^")) if text != "^^" else None  # noqa: E731
    return fields[0], code(fields[1]), code(fields[2]), code(fields[3])


def all_types():
    document = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    return [(category, entry) for category in document["SegmentationCodes"]["Category"]
            for entry in category["Type"]]


def test_the_file_is_a_slicer_segment_context_with_master_list_codes():
    document = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    assert document["@schema"] == SEGMENT_CONTEXT_SCHEMA
    assert document["SegmentationCategoryTypeContextName"] == context_name() == \
        "Segmentation category and type - SegmentMBTFE"
    types = {entry["CodeMeaning"]: entry for _, entry in all_types()}
    assert {meaning: entry["CodeValue"] for meaning, entry in types.items()} == MASTER_LIST_TYPES
    labels = []
    for category, entry in all_types():
        expected_category = ALTERED if entry["CodeMeaning"] == "Neoplasm" else ANATOMY
        assert (category["CodingSchemeDesignator"], category["CodeValue"], category["CodeMeaning"]) == \
            expected_category
        for item in [entry] + entry.get("Modifier", []):
            assert item["CodingSchemeDesignator"] == "SCT"
            rgb = item["recommendedDisplayRGBValue"]
            assert len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb), item
            labels.append(item["3dSlicerLabel"])
        for modifier in entry.get("Modifier", []):
            assert MODIFIERS[modifier["CodeMeaning"]] == modifier["CodeValue"]
    # Slicer's FindTypeInTerminologyBy3dSlicerLabel returns the first match: labels must be unique.
    assert len(labels) == len(set(labels))
    modifiers = {entry["CodeMeaning"]: [m["CodeMeaning"] for m in entry.get("Modifier", [])]
                 for _, entry in all_types()}
    assert modifiers["Hippocampus"] == ["Left", "Right", "Anterior", "Posterior"]
    assert modifiers["Kidney"] == ["Left", "Right"] and modifiers["Liver"] == []


@pytest.mark.parametrize("name, model_context, expected_type, expected_modifier", [
    ("anterior", "Dataset004_Hippocampus", "Hippocampus", "Anterior"),
    ("posterior", "Dataset004_Hippocampus", "Hippocampus", "Posterior"),
    ("Hippocampus", "", "Hippocampus", None),
    ("kidney_left", "", "Kidney", "Left"),
    ("rightKidney", "", "Kidney", "Right"),
    ("left lung", "", "Lung", "Left"),
    ("adrenal-gland right", "", "Adrenal gland", "Right"),
    ("Liver", "Dataset003_Liver", "Liver", None),
    ("cancer", "Dataset003_Liver", "Neoplasm", None),  # not the dataset's Liver
    ("tumour", "", "Neoplasm", None),
    ("kidney tumor", "", "Neoplasm", None),  # the lesion, not the organ it lies in
    ("urinary_bladder", "", "Bladder", None),
    ("bladder", "", "Bladder", None),
    ("gall bladder", "", "Gallbladder", None),
    ("small bowel", "", "Small Intestine", None),
    ("inferior_vena_cava", "", "Inferior vena cava", None),
])
def test_known_names_get_the_file_s_codes(name, model_context, expected_type, expected_modifier):
    context, category, type_, modifier = parts(terminology_for(name, model_context))
    assert context == context_name()
    assert type_ == ("SCT", MASTER_LIST_TYPES[expected_type], expected_type)
    assert category == (ALTERED if expected_type == "Neoplasm" else ANATOMY)
    assert modifier == (None if expected_modifier is None
                        else ("SCT", MODIFIERS[expected_modifier], expected_modifier))


@pytest.mark.parametrize("name, model_context", [
    ("edema", "Dataset004_Hippocampus"),
    ("label 7", ""),
    ("anterior", ""),                      # a part of nothing known
    ("posterior", "Dataset003_Liver"),     # the liver has no posterior modifier in Slicer's lists
    ("left liver", ""),
    ("left anterior hippocampus", ""),     # one entry holds one modifier
])
def test_unknown_names_and_modifiers_get_none(name, model_context):
    assert terminology_for(name, model_context) is None


def test_seg_nrrd_carries_terminology_by_default(tmp_path):
    """What `segment-mbtfe predict -o x.seg.nrrd` writes: write_prediction with no terminology argument."""
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    labels[2, 2, 2] = 2
    prediction = SimpleNamespace(labels=Volume(labels), segments=[(1, "anterior"), (2, "posterior")],
                                 settings={"model": "Dataset004_Hippocampus"}, probabilities=None)
    path, = write_prediction(prediction, tmp_path / "case.seg.nrrd")
    _, segments, _ = read_seg_nrrd(path)
    assert [s.terminology for s in segments] == [terminology_for("anterior", "Dataset004_Hippocampus"),
                                                 terminology_for("posterior", "Dataset004_Hippocampus")]
    assert parts(segments[1].terminology)[3] == ("SCT", "255551008", "Posterior")

    path, = write_prediction(prediction, tmp_path / "plain.seg.nrrd", terminology=None)
    assert [s.terminology for s in read_seg_nrrd(path)[1]] == [None, None]


def test_predict_command_writes_terminology_into_seg_nrrd(tmp_path):
    """`segment-mbtfe predict -o x.seg.nrrd` with a hippocampus model: standard codes without being asked."""
    from SegmentMBTFELib import cli
    model = model_factory.make_model_folder(tmp_path / "models", dataset_name="Dataset004_Hippocampus")
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 14, 10)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    output = tmp_path / "case.seg.nrrd"
    assert cli.main(["predict", "--no-tta", "-q", "-m", str(model), "-i", str(tmp_path / "case.nii.gz"),
                     "-o", str(output)]) == 0
    _, segments, _ = read_seg_nrrd(output)
    assert [(s.name, parts(s.terminology)[2:]) for s in segments] == [
        ("anterior", (("SCT", "5366008", "Hippocampus"), ("SCT", "255549009", "Anterior"))),
        ("posterior", (("SCT", "5366008", "Hippocampus"), ("SCT", "255551008", "Posterior")))]
