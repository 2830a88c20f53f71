from edge.errors import EdgeError


class SimError(EdgeError):
    """Bad input to the emulator: exit code 2 with one line."""
