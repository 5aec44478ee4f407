"""Lavender: diffusion instruction tuning."""

__version__ = "0.1.0"
