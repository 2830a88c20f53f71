"""firmware_sim: emulated sensor devices, fault injection, an end-to-end scorer, a Pi-class
host profile and the one-command demo."""

from edge._version import __version__

__all__ = ["__version__"]
