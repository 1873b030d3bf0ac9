"""Standard terminology (SNOMED CT codes in Slicer's TerminologyEntry string) for label names we recognise.

Slicer shows a segment's terminology in the Segment Editor and writes it into DICOM SEG, so a segment
called "liver" that carries the SNOMED CT code for Liver stays meaningful outside this model. Slicer shows
an entry only when the terminology context it names is loaded and holds its category, type and modifier,
and the lists Slicer ships do not hold all of ours (its General Anatomy list has no hippocampus, no list
has anterior/posterior modifiers). So, as SlicerTotalSegmentator does, we ship our own context:
SegmentMBTFE.term.json beside this file, in the dcmqi segment-context schema that Slicer's
`vtkSlicerTerminologiesModuleLogic::LoadTerminologyFromFile` reads (SegmentMBTFESlicer/terminology.py
loads it into Slicer).

That file is the single source of truth: this module reads the structures, codes and modifiers from it,
so the names we recognise and the codes Slicer loads cannot drift apart. It is a hand-kept subset of
Slicer's DICOM master list (Modules/Loadable/Terminologies/Resources/
SegmentationCategoryTypeModifier-DICOM-Master.json): each entry is copied from there, codes and meanings
included, with only the Left/Right modifiers kept. Where that list gives a structure no colour or
3dSlicerLabel, they come from Slicer's other lists (General Anatomy "Vein" for the inferior vena cava and
portal vein, its left/right entries for kidney, lung and adrenal gland), its colour files (hippocampus
from SPL-BrainAtlas-2012, neoplasm from the "Tumor" label) or TotalSegmentator's labels. The Anterior
(SCT 255549009) and Posterior (SCT 255551008) hippocampus modifiers, in none of Slicer's lists, take the
module's own colours for labels 1 and 2: the labels those parts have in the Medical Segmentation
Decathlon hippocampus dataset.

Names are matched loosely (case, "_" or "-" for spaces, camelCase, a modifier word anywhere) against each
type's code meaning and 3dSlicerLabel, plus the few other words in ALIASES. A name we do not know, or a
modifier the structure does not have in the file ("posterior liver"), gets no terminology rather than
a guessed one. A name with both a lesion and an organ ("kidney tumor") is the lesion: calling a tumour's
segment "Kidney" would be a wrong code, while the organ is only where the lesion is.
"""
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

TERMINOLOGY_FILE = Path(__file__).with_name("SegmentMBTFE.term.json")
# Slicer's anatomic (region) context; we set no region, but Slicer writes the context name all the same.
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
NO_CODE = "^^"
# Words people use for a structure that are neither its code meaning nor its 3dSlicerLabel in the file
# ("bladder" and "small bowel" need no entry: they are the Bladder type's meaning and Small Intestine's label).
ALIASES = {
    "tumor": "neoplasm",
    "tumour": "neoplasm",
    "cancer": "neoplasm",
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "ivc": "inferior vena cava",
}


class _Type(NamedTuple):
    category: str               # "SCT^123037004^Anatomical Structure"
    code: str                   # "SCT^5366008^Hippocampus"
    modifiers: Dict[str, str]   # modifier word ("left") -> "SCT^7771000^Left"
    lesion: bool                # in a category whose types lie in an anatomic region (showAnatomy), e.g. Neoplasm


def terminology_for(name: str, model_context: str = "") -> Optional[str]:
    """Slicer's TerminologyEntry string for a label name, or None when the name is not a known structure.

    `model_context` (the model's dataset name) lets bare part names count: the Medical Segmentation
    Decathlon hippocampus labels are just "anterior" and "posterior", which are parts of the
    hippocampus only because the dataset says so.
    """
    context, names, modifier_words = _vocabulary()
    words = _words(name)
    found = _find_type(words, names)
    modifiers = [word for word in modifier_words if f" {word} " in words]
    if found is None and modifiers:
        found = _find_type(_words(model_context), names)  # a part ("anterior") of the dataset's structure
    if found is None or len(modifiers) > 1:
        return None  # unknown, or "left anterior ...": one entry holds one modifier, so no guess
    modifier = NO_CODE
    if modifiers:
        if modifiers[0] not in found.modifiers:
            return None  # e.g. a "posterior" part of the liver: the file has no such entry
        modifier = found.modifiers[modifiers[0]]
    return "~".join([context, found.category, found.code, modifier, ANATOMIC_CONTEXT, NO_CODE, NO_CODE])


def context_name() -> str:
    """The SegmentationCategoryTypeContextName of our terminology file (what Slicer knows it by)."""
    return _vocabulary()[0]


@lru_cache(maxsize=1)
def _vocabulary() -> Tuple[str, List[Tuple[str, _Type]], List[str]]:
    """(context name, (structure name, type) in matching order, modifier words), read once from the file."""
    document = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    types: Dict[str, _Type] = {}
    modifier_words = set()
    for category in document["SegmentationCodes"]["Category"]:
        for entry in category["Type"]:
            modifiers = {modifier["CodeMeaning"].lower(): _code(modifier) for modifier in entry.get("Modifier", [])}
            modifier_words.update(modifiers)
            found = _Type(_code(category), _code(entry), modifiers, bool(category.get("showAnatomy", True)))
            for name in (entry["CodeMeaning"], entry.get("3dSlicerLabel", "")):
                if name:
                    types[_words(name).strip()] = found
    for alias, name in ALIASES.items():
        types[alias] = types[name]
    # Lesions before organs ("kidney tumor"), then longest names first ("inferior vena cava" before any
    # shorter name inside it, "gall bladder" before "bladder").
    names = sorted(types.items(), key=lambda item: (not item[1].lesion, -len(item[0])))
    return document["SegmentationCategoryTypeContextName"], names, sorted(modifier_words)


def _code(item: dict) -> str:
    return f"{item['CodingSchemeDesignator']}^{item['CodeValue']}^{item['CodeMeaning']}"


def _words(text: str) -> str:
    parts = re.split(r"[\s_\-/,.()]+|(?<=[a-z])(?=[A-Z])", str(text))  # also splits camelCase
    return " " + " ".join(p.lower() for p in parts if p) + " "


def _find_type(words: str, names: List[Tuple[str, _Type]]) -> Optional[_Type]:
    for name, found in names:
        if f" {name} " in words:
            return found
    return None
