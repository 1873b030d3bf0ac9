"""Models as people have them: nnU-Net v2 and v1 folders, checkpoints, zips, the models home, versions."""
