"""The numeric contract of a bundle: the kernel sets it was verified with, checked against the
kernel set the runtime really got (``edge.backend.kernel_set``).

An int8 step model feeds its rounded state back, so two kernel sets that differ by one LSB give
streams that drift apart. A bundle therefore runs only on a kernel set the converter verified
it with, unless ``kernel_mismatch = "warn"`` accepts the difference (loudly, never silently).
A manifest from before kernel sets were recorded is treated like a mismatch: nothing says which
kernels its figures hold for.
"""

from __future__ import annotations

import warnings

from .errors import BundleError, shown
from .manifest import Manifest

KERNEL_POLICIES = ("refuse", "warn")
HINT = (
    "run it with an interpreter that gives a verified kernel set, re-run lstm-convert where "
    'this interpreter is reachable, or accept the difference with kernel_mismatch = "warn" '
    "(--kernel-mismatch warn)"
)


class KernelMismatchWarning(RuntimeWarning):
    """A bundle runs on kernels it was not verified with (``kernel_mismatch = "warn"``)."""


def mismatch(manifest: Manifest, got: str) -> str | None:
    """None when ``got`` is a kernel set the bundle was verified with; else why not, one line."""
    verified = manifest.verified_kernels
    if verified is None:
        return (
            f"this runtime computes with kernel set {shown(got)} but the manifest records no "
            "verified "
            "kernel set (made by an older lstm-convert)"
        )
    if got in verified:
        return None
    listed = ", ".join(repr(v) for v in verified) or "none"
    return (
        f"this runtime computes with kernel set {shown(got)} but the bundle was verified with "
        f"{listed}; "
        "its results would differ from the verified ones"
    )


def enforce(manifest: Manifest, got: str, policy: str, where: str) -> None:
    """Refuse (``BundleError``) or warn (``KernelMismatchWarning``) on a mismatch."""
    if policy not in KERNEL_POLICIES:
        raise BundleError(
            f"kernel_mismatch {shown(policy)} is not one of {', '.join(KERNEL_POLICIES)}"
        )
    why = mismatch(manifest, got)
    if why is None:
        return
    if policy == "refuse":
        raise BundleError(f"{where}: {why}; {HINT}")
    warnings.warn(
        f"{where}: {why}; running anyway (kernel_mismatch = warn)",
        KernelMismatchWarning,
        stacklevel=3,
    )
