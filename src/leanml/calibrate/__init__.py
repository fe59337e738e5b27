"""Calibration statistics gathered from layer inputs (Hessians, per-channel activation stats)."""
