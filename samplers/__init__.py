"""hasten.samplers."""
