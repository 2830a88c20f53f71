"""Converter errors: every one becomes exit code 2 and one line on stderr."""

from edge.errors import EdgeError


class ConvertError(EdgeError):
    """Bad input to the converter (model, calibration data, output directory)."""


class UnsupportedModel(ConvertError):
    """A layer that cannot be streamed one causal step at a time."""


class VerificationFailed(ConvertError):
    """The bundle broke a hard rule (forbidden op, no interpreter could run it)."""
