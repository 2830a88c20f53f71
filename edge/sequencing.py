"""Per-stream sequence numbers: pure functions, no state of their own.

``seq`` is an unsigned 32-bit counter that may wrap. Comparison uses serial-number arithmetic
(RFC 1982): ``seq`` is ahead of ``last`` when ``(seq - last) mod 2**32`` is in ``1 .. 2**31-1``.
A message carrying k samples with ``seq = s`` holds samples ``s, s+1, ..., s+k-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

U32 = 1 << 32
HALF = 1 << 31
GAP_POLICIES = ("continue", "reset", "reject")
BOOT_BEHIND = 16  # an unseen boot id at most this far below the current one is an earlier boot


def earlier_boot(boot: int, current: int | None, earlier: list[int]) -> bool:
    """Whether ``boot`` is a life of the device before its ``current`` one: one seen before it,
    or an unseen id at most ``BOOT_BEHIND`` below it. The latter is a device counting its
    boots whose short-lived boot was heard only after the next one began (else that late
    message would restart the stream and every later message of the live boot would be
    stale). A random nonce lands there about once in 2**28 boots."""
    if boot in earlier:
        return True
    return current is not None and 0 < (current - boot) % U32 <= BOOT_BEHIND


@dataclass(frozen=True)
class Admission:
    """How many leading samples of a chunk are duplicates, and the gap before the rest."""

    duplicates: int
    gap: int
    first_new: int | None  # seq of the first applied sample, None when all are duplicates


def admit(last: int | None, seq: int, count: int) -> Admission:
    if not 0 <= seq < U32:
        raise ValueError(f"seq {seq} is outside the unsigned 32-bit range")
    if last is None:
        return Admission(0, 0, seq)
    ahead = (seq - last) % U32
    if 0 < ahead < HALF:
        return Admission(0, ahead - 1, seq)
    behind = (last - seq) % U32  # 0 .. 2**31: seq is at or before last
    dups = min(count, behind + 1)
    if dups == count:
        return Admission(count, 0, None)
    return Admission(dups, 0, (last + 1) % U32)


def last_of(first: int, count: int) -> int:
    return (first + count - 1) % U32
