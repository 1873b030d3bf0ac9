"""Images in and results out: NIfTI/NRRD/DICOM reading, Slicer segmentation files, DICOM SEG, colours, terminology."""
