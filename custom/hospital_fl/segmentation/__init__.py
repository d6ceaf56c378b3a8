"""3D brain-tumour segmentation: datalists, real and synthetic volumes, and the MONAI pipeline."""
