"""Standard terminology (SNOMED CT codes in Slicer's TerminologyEntry string) for label names we recognise.

Slicer shows a segment's terminology in the Segment Editor and writes it into DICOM SEG, so a segment
called "liver" that carries the SNOMED CT code for Liver stays meaningful outside this model. Names are
matched loosely (case, "_" or "-" for spaces, a left/right word anywhere); a name we do not know gets no
terminology rather than a guessed one.
"""
import re
from typing import Optional

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
MORPHOLOGICALLY_ALTERED = "SCT^49755003^Morphologically Altered Structure"

# structure name -> (category, SNOMED CT code, code meaning)
STRUCTURES = {
    "hippocampus": (ANATOMICAL_STRUCTURE, "5976007", "Hippocampus"),
    "liver": (ANATOMICAL_STRUCTURE, "10200004", "Liver"),
    "spleen": (ANATOMICAL_STRUCTURE, "78961009", "Spleen"),
    "kidney": (ANATOMICAL_STRUCTURE, "64033007", "Kidney"),
    "pancreas": (ANATOMICAL_STRUCTURE, "15776009", "Pancreas"),
    "gallbladder": (ANATOMICAL_STRUCTURE, "28231008", "Gallbladder"),
    "stomach": (ANATOMICAL_STRUCTURE, "69695003", "Stomach"),
    "aorta": (ANATOMICAL_STRUCTURE, "15825003", "Aorta"),
    "inferior vena cava": (ANATOMICAL_STRUCTURE, "64131007", "Inferior vena cava"),
    "portal vein": (ANATOMICAL_STRUCTURE, "32764006", "Portal vein"),
    "adrenal gland": (ANATOMICAL_STRUCTURE, "23451007", "Adrenal gland"),
    "esophagus": (ANATOMICAL_STRUCTURE, "32849002", "Esophagus"),
    "trachea": (ANATOMICAL_STRUCTURE, "44567001", "Trachea"),
    "heart": (ANATOMICAL_STRUCTURE, "80891009", "Heart"),
    "brain": (ANATOMICAL_STRUCTURE, "12738006", "Brain"),
    "duodenum": (ANATOMICAL_STRUCTURE, "38848004", "Duodenum"),
    "colon": (ANATOMICAL_STRUCTURE, "71854001", "Colon"),
    "small bowel": (ANATOMICAL_STRUCTURE, "30315005", "Small Intestine"),
    "small intestine": (ANATOMICAL_STRUCTURE, "30315005", "Small Intestine"),
    "urinary bladder": (ANATOMICAL_STRUCTURE, "89837001", "Urinary bladder"),
    "bladder": (ANATOMICAL_STRUCTURE, "89837001", "Urinary bladder"),
    "prostate": (ANATOMICAL_STRUCTURE, "41216001", "Prostate"),
    "lung": (ANATOMICAL_STRUCTURE, "39607008", "Lung"),
    "tumor": (MORPHOLOGICALLY_ALTERED, "108369006", "Neoplasm"),
    "tumour": (MORPHOLOGICALLY_ALTERED, "108369006", "Neoplasm"),
    "cancer": (MORPHOLOGICALLY_ALTERED, "108369006", "Neoplasm"),
}
MODIFIERS = {
    "left": "SCT^7771000^Left",
    "right": "SCT^24028007^Right",
    "anterior": "SCT^255549009^Anterior",
    "posterior": "SCT^255551008^Posterior",
}
NO_CODE = "^^"


def terminology_for(name: str, model_context: str = "") -> Optional[str]:
    """Slicer's TerminologyEntry string for a label name, or None when the name is not a known structure.

    `model_context` (the model's dataset name) lets bare part names count: the Medical Segmentation
    Decathlon hippocampus labels are just "anterior" and "posterior", which are parts of the
    hippocampus only because the dataset says so.
    """
    words = _words(name)
    structure, modifier = _structure(words), _modifier(words)
    if structure is None and modifier is not None:
        structure = _structure(_words(model_context))  # a part ("anterior") of the dataset's structure
    if structure is None:
        return None
    category, code, meaning = STRUCTURES[structure]
    return "~".join([CONTEXT, category, f"SCT^{code}^{meaning}", modifier or NO_CODE,
                     ANATOMIC_CONTEXT, NO_CODE, NO_CODE])


def _words(text: str) -> str:
    parts = re.split(r"[\s_\-/,.()]+|(?<=[a-z])(?=[A-Z])", str(text))  # also splits camelCase
    return " " + " ".join(p.lower() for p in parts if p) + " "


def _structure(words: str) -> Optional[str]:
    # longest names first, so "inferior vena cava" wins over nothing and "small bowel" over "bowel"
    for structure in sorted(STRUCTURES, key=len, reverse=True):
        if f" {structure} " in words:
            return structure
    return None


def _modifier(words: str) -> Optional[str]:
    for word, code in MODIFIERS.items():
        if f" {word} " in words:
            return code
    return None
