"""SegmentMBTFESlicer: the module-side half of SegmentMBTFE (Slicer's process: MRML and Qt, never torch).

The panel
  segment_panel   the Segment section: model, inputs, output, advanced settings, Segment, Cancel
  finetune_panel  the Fine-tune section: corrected cases, budget, Dice before/after, model versions
  panel           what the sections show: button states, progress text, error lines
  job_controller  the panel's one job at a time, shared by both sections
Jobs and the worker process
  logic           the console API's work: every engine call is a job for the worker
  jobs            one job seen from the main thread (progress, cancel, outcome); the application's busy flag
  worker          the worker process (`segment-mbtfe worker` run by PythonSlicer): started, kept, restarted, stopped
The scene
  runner          main-thread steps: volumes copied in, segments written out, corrected cases copied out
  volumes         volume nodes <-> engine Volumes (RAS <-> LPS)
  segmentation    a label map into segments, replacing only this model's; provenance; transforms
  corrections     corrected segments -> the model's label map (by tags or names; the rest reported)
  uncertainty_display  the uncertainty maps as volumes over the image, a colour legend, a table per segment
Around them
  catalog         the models to offer (those `models list` shows), adding a folder or zip; JSON only
  dependencies    torch via the PyTorch extension, the rest via pip, never replacing Slicer's packages
  terminology     loads the engine's terminology context into Slicer
  resources       where Resources/ is; selftest: the in-Slicer self-test's steps

Nothing here imports torch: the engine runs in the worker process (see worker_process.py for why).
"""
