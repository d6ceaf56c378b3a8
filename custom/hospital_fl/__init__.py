"""hospital_fl: federated medical-imaging training for hospital consortia on NVIDIA FLARE."""

__version__ = "0.1.0"
