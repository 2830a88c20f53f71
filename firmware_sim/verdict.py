"""The one line a run ends with: exact or not, accuracy, p99 latency, anything lost."""

from __future__ import annotations

from typing import Any


def judged(r: dict[str, Any]) -> bool:
    """Whether the run delivered anything to judge: a run that sent nothing (a rate below one
    sample per duration) or lost all it sent (every message dropped) proves nothing."""
    return int(r.get("samples_delivered_valid", 1)) > 0  # figures without it: judged as given


def verdict(r: dict[str, Any]) -> str:
    """``exact`` means every prediction equals an offline run of the same bundle over what
    the devices delivered, no expected prediction is missing, and the broker acknowledged
    every message the devices sent."""
    wrong = r.get("wrong_predictions")
    missing = int(r.get("predictions_missing", 0))
    got = int(r.get("predictions_received", 0))
    unacked = int(r.get("messages_not_delivered", 0))
    undelivered = (
        f"{unacked:,} message{'s' if unacked != 1 else ''} not delivered "
        f"(the broker did not acknowledge {'them' if unacked != 1 else 'it'}: it went away)"
    )
    if not judged(r):
        created = int(r.get("messages_created", 0))
        head = (
            "NOTHING JUDGED: no valid sample was delivered "
            f"({created:,} message{'s' if created != 1 else ''} created)"
        )
    elif missing and int(r.get("scorer_cut_off_from_broker", 0)):
        cut = int(r["scorer_cut_off_from_broker"])
        head = (
            f"NOT JUDGED: {missing:,} expected predictions missing, but the scorer lost its "
            f"connection to the broker {cut:,} time{'s' if cut != 1 else ''} (answers published "
            "meanwhile never reached it): run again with the broker up throughout"
        )
    elif wrong is None:
        head = "no offline reference (run with --bundle to judge exactness)"
        if missing:  # the one failure a run without a reference can still see
            head = f"NOT ALL ANSWERED: {missing:,} expected predictions missing; {head}"
    elif wrong == 0 and missing == 0 and unacked:  # exact over what the broker took only
        head = f"NOT ALL DELIVERED: {undelivered}; the {got:,} predictions equal the offline run"
    elif wrong == 0 and missing == 0:
        head = f"EXACT: all {got:,} predictions equal the offline run"
    else:
        parts = []
        if wrong:
            parts.append(f"{wrong:,} of {got:,} predictions differ from the offline run")
        if missing:
            parts.append(f"{missing:,} expected predictions missing")
        head = "NOT EXACT: " + ", ".join(parts)
    tail = []
    if unacked and not head.startswith("NOT ALL DELIVERED"):
        tail.append(undelivered)
    if r.get("accuracy_runtime") is not None:
        tail.append(f"accuracy {r['accuracy_runtime']:.1%}")
    if r.get("latency_p99_ms") is not None:
        tail.append(f"p99 latency {r['latency_p99_ms']:.0f} ms")
    late = int(r.get("late_beyond_reorder_window", 0))
    if late:
        tail.append(f"{late:,} sample{'s' if late != 1 else ''} late beyond the reorder window")
    return "verdict: " + head + ("; " + ", ".join(tail) if tail else "")
