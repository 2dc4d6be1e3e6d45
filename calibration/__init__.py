"""Calibration: observers that turn streamed activations into ranges, and ranges into qparams."""
