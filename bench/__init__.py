"""hasten.bench."""
