"""SegmentMBTFESlicer: the module-side half of SegmentMBTFE (MRML and Qt glue around the engine).

volumes       volume nodes <-> engine Volumes (RAS <-> LPS)
segmentation  a label map into a segmentation node, replacing only this model's segments; provenance
terminology   loads our terminology context into Slicer (names and codes are the engine's terminology)
catalog       the models to offer (shipped + added folders), read from JSON only
dependencies  torch via the PyTorch extension, the rest via pip, never replacing Slicer's packages
jobs          a segmentation in a worker thread, events to the main thread through a queue
runner        the steps the Segment and Fine-tune buttons and the console API share
panel         what the panel shows: Segment button state, progress text, folds
corrections   corrected segments -> the model's label map (by tags or names; the rest reported, never guessed)
finetune_panel the Fine-tune section: corrected cases, budget, progress, Dice before/after, model versions
selftest      a tiny, untrained model folder for the self-test inside Slicer

Nothing here imports torch at import time: Slicer loads the module before PyTorch may be installed.
"""
