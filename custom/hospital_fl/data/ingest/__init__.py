"""Turning a hospital's DICOM archive into a training-ready site dataset, and its data profile."""
