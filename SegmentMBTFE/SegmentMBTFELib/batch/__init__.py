"""Many cases with the model loaded once: a folder, its stages overlapped, spread over GPUs or a Dask cluster."""
