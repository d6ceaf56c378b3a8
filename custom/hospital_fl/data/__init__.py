"""Datasets, site splits and (later) DICOM ingestion."""
