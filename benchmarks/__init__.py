"""Measurements of what attention consistency costs on top of a training step (see README.md)."""
