"""hasten.web."""
