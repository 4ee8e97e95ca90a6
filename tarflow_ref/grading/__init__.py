"""Automatic checks for the course assignments in assignments/ (see assignments/README.md)."""
from .report import CheckFailed

__all__ = ["CheckFailed"]
