"""Calibration engine: data → block maps → sequential block-by-block runner (with offload)."""
