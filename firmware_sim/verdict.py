"""The one line a run ends with: exact or not, accuracy, p99 latency, anything lost."""

from __future__ import annotations

from typing import Any


def judged(r: dict[str, Any]) -> bool:
    """Whether the run delivered anything to judge: a run that sent nothing (a rate below one
    sample per duration) or lost all it sent (every message dropped) proves nothing."""
    return int(r.get("samples_delivered_valid", 1)) > 0  # figures without it: judged as given


def failures(r: dict[str, Any]) -> list[str]:
    """What fails a run besides wrong values and missing predictions, one text each."""
    out: list[str] = []
    bad = int(r.get("malformed_answers", 0))
    if bad:
        which = "; ".join(f"{s}: {why}" for s, why in r.get("malformed_examples", [])[:2])
        out.append(f"{bad:,} answer{'s' if bad != 1 else ''} no consumer can read ({which})")
    extra = int(r.get("unexpected_predictions", 0))
    if extra:  # a sample never sent, or one that should have been refused (NaN, garbage)
        which = ", ".join(" ".join(map(str, k)) for k in r.get("unexpected_examples", [])[:3])
        out.append(
            f"{extra:,} prediction{'s' if extra != 1 else ''} for samples that should have none"
            + (f" ({which})" if which else "")
        )
    unjudged = int(r.get("predictions_not_compared", 0))
    if unjudged:
        out.append(
            f"{unjudged:,} prediction{'s' if unjudged != 1 else ''} the offline run computed "
            "nothing for (it refused their samples: is --bundle the bundle the runtime serves?)"
        )
    other = int(r.get("predictions_other_model", 0))
    if other:
        names = ", ".join(r.get("other_models", {}))
        out.append(
            f"{other:,} prediction{'s' if other != 1 else ''} name model {names}, not "
            f"--bundle's {r.get('bundle_model')} (the runtime serves another bundle)"
        )
    mislabelled = int(r.get("labels_wrong", 0))
    if mislabelled:
        stream, seq, said, due = r.get("labels_wrong_examples", [("?", "?", "??", "??")])[0]
        out.append(
            f"{mislabelled:,} prediction{'s' if mislabelled != 1 else ''} whose label or p is "
            f"not their y's top class (e.g. {stream} seq {seq}: label {said[0]!r} p {said[1]}, "
            f"y's top {due[0]!r} {due[1]})"
        )
    unflagged = int(r.get("restarts_missing", 0))
    if unflagged:
        stream, epoch = r.get("restarts_missing_examples", [("?", "?")])[0]
        out.append(
            f"{unflagged:,} device reboot{'s' if unflagged != 1 else ''} answered without "
            f'"restart": true (e.g. {stream}, its boot {epoch} counted from 0)'
        )
    spurious = int(r.get("restarts_spurious", 0))
    if spurious:
        stream, _, seq = r.get("restarts_spurious_examples", [("?", "?", "?")])[0]
        out.append(
            f'{spurious:,} "restart" flag{"s" if spurious != 1 else ""} on an answer that is '
            f"not its boot's first (e.g. {stream} seq {seq})"
        )
    gaps = int(r.get("gaps_wrong", 0))
    if gaps:
        (stream, _, seq), said, due = r.get("gaps_wrong_examples", [(("?", 0, "?"), "?", "?")])[0]
        out.append(
            f"{gaps:,} answer{'s' if gaps != 1 else ''} with a wrong gap (e.g. {stream} seq "
            f"{seq}: gap {said}, {due} skipped)"
        )
    silent = int(r.get("invalid_unanswered", 0))
    if silent and not r.get("scorer_cut_off_from_broker"):  # else its error may have passed us
        streams = ", ".join(r.get("invalid_unanswered_examples", [])[:3])
        out.append(
            f"{silent:,} invalid message{'s' if silent != 1 else ''} (NaN, garbage, wrong feature "
            f"count) answered with no error (on {streams})"
        )
    crashed = int(r.get("errors_by_code", {}).get("internal", 0))
    if crashed:  # the runtime failed on a message it should have answered or refused
        out.append(
            f"{crashed:,} answer{'s' if crashed != 1 else ''} 'internal' (an exception in the "
            "runtime: its id finds the traceback in the runtime's log)"
        )
    return out


def passed(r: dict[str, Any]) -> bool:
    """No expected prediction missing, every message delivered, something judged, none of
    ``failures``, and no prediction that differs from an offline run in the runtime's own
    kernel set: what ``run`` exits 0 on (the demo also wants none that differs at all). An
    offline run in another kernel set (``--kernels``, or none here computes with the
    runtime's) differs by the kernels: its wrong predictions are figures, not a failure."""
    own = r.get("offline_kernels") is not None and r.get("offline_kernels") == r.get(
        "runtime_kernels"
    )
    return (
        int(r.get("predictions_missing", 0)) == 0
        and not r.get("messages_not_delivered")
        and judged(r)
        and not failures(r)
        and not (own and r.get("wrong_predictions"))
    )


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
            "meanwhile never reached it): run again with the broker up throughout, and "
            "without another firmware-sim run on this broker (its scorer has the same client "
            "id: the broker drops one of the two at each connect of the other)"
        )
    else:
        parts = []
        if wrong:
            parts.append(f"{wrong:,} of {got:,} predictions differ from the offline run")
        if missing:
            parts.append(f"{missing:,} expected predictions missing")
        parts += failures(r)
        if wrong is None:
            head = "no offline reference (run with --bundle to judge exactness)"
            if parts:  # the failures a run without a reference can still see
                kind = "NOT ALL ANSWERED" if missing else "NOT EXACT"
                head = f"{kind}: {', '.join(parts)}; {head}"
        elif parts:
            head = "NOT EXACT: " + ", ".join(parts)
        elif unacked:  # exact over what the broker took only
            head = (
                f"NOT ALL DELIVERED: {undelivered}; the {got:,} predictions equal the offline run"
            )
        else:
            head = f"EXACT: all {got:,} predictions equal the offline run"
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
    left = int(r.get("excluded_samples", 0))
    if left:  # a verdict over part of the run says so, not only the table
        tail.append(
            f"{left:,} sample{'s' if left != 1 else ''} not judged (devices rebooted without boot "
            "ids and the runtime could not tell: see excluded reasons)"
        )
    return "verdict: " + head + ("; " + ", ".join(tail) if tail else "")
