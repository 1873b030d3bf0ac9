"""Which kind of image (CT, MR) a model's input channel expects, read from its channel name in dataset.json.

One home for the mapping, because two places need the same answer: the Slicer panel shows a model's
modality, and the DICOM reader picks, from a folder holding several series, the series whose Modality
(0008,0060) the channel expects. nnU-Net's channel names double as normalisation choices ("CT" selects CT
normalisation), so "CT" is a sure sign; MR channels are named by their sequence (T1, T2, FLAIR, ADC, ...).
A name that fits neither ("noNorm", "PET") expects nothing in particular.
"""
from typing import Sequence

CT_WORDS = ("ct", "computed tomography")
MR_WORDS = ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "t1ce", "t1gd", "magnetic")


def channel_modality(name: str) -> str:
    """'CT' or 'MR' (DICOM's Modality values) for one channel name, '' when the name does not say."""
    word = str(name).strip().lower()
    if word in CT_WORDS:
        return "CT"
    if any(word == m or word.startswith(m + " ") for m in MR_WORDS):
        return "MR"
    return ""


def modality(channels: Sequence[str]) -> str:
    """'CT', 'MR' or the channel names themselves: what kind of image each input expects."""
    kinds = {channel_modality(c) for c in channels}
    if channels and len(kinds) == 1 and "" not in kinds:
        return kinds.pop()
    return ", ".join(channels) or "unknown"
