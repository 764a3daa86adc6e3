"""hasten.kernels."""
