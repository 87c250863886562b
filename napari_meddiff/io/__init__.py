"""Files in and out: volumes with their geometry (NIfTI, SimpleITK formats), resampling between grids,
intensity normalisation, and atomic writes that never leave half a file."""
