"""firmware_sim: emulated sensor devices, fault injection, an end-to-end scorer, a Pi-class
host profile and the one-command demo."""

__version__ = "0.1.0"
