"""Training and evaluation loops: pure torch + MONAI, no FLARE."""
