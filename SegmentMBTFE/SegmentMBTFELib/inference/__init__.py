"""From a loaded model and an image to a label map: preprocessing, the sliding window, export, devices."""
