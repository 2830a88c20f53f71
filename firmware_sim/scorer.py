"""Judge a run end to end: match every prediction and error to what was sent by
``(stream, boot, seq)``, and compare with an offline run of the same bundle.

Devices may reboot: a boot restarts the seq, so ``(stream, seq)`` alone no longer names one
sample. Ground truth keys samples by ``(stream, epoch, seq)`` (epoch: the device's boot
count). An answer is attributed to an epoch by the ``boot`` it carries, else (devices without
boot ids) by which candidate's expected value it equals, else by time (the newest boot that
had published that seq before the answer arrived). The expected value of every sample is the
offline engine run from zero state from the first sample of its boot.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import shown
from edge.topics import Template

from .devices import Key, Sent
from .errors import SimError
from .mqtt import Link, close_client, connect, link, new_client, templates

U32 = 2**32
HALF = 2**31


def start(client: Any, url: str | Link, subscribed: threading.Event) -> None:
    """Connect, run the network loop, and wait until the broker confirmed the subscription."""
    try:
        connect(client, url)
    except OSError as exc:
        raise SimError(f"broker {url} is unreachable: {exc}") from exc
    client.loop_start()
    if not subscribed.wait(10):
        raise SimError(f"broker {url}: no answer to our subscription within 10 s")


class Scorer:
    """Collects predictions, errors and runtime status. ``persistent``: a fixed session the
    broker keeps while we are cut off (broker restarts), so no answer passes us by."""

    def __init__(
        self,
        url: str | Link,
        client_id: str = "firmware-sim-scorer",
        configure: Any = None,
        persistent: bool = False,
    ) -> None:
        self.lock = threading.Lock()
        self.predictions: list[tuple[str, dict[str, Any], float]] = []
        self.errors: list[tuple[str, dict[str, Any], float]] = []
        self.status: dict[str, str] = {}
        self.status_log: list[tuple[str, dict[str, Any], float]] = []
        # (stream, payload) of answers that are no JSON object
        self.unreadable: list[tuple[str, bytes]] = []
        # where the runtime answers: its prediction, error and status topics
        self.answers, self.refusals, self.status_topic = templates(link(url))
        self.client = new_client(url, client_id, clean_session=not persistent)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        refused: list[str] = []
        answered = threading.Event()  # a CONNACK came

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, *rest: Any) -> None:
            answered.set()
            if reason.is_failure:  # e.g. a broker that wants a user name: say so at once
                refused.append(f"refused the connection: {reason}")
                ready.set()
                return
            c.subscribe(
                [
                    (self.answers.filter, 1),
                    (self.refusals.filter, 1),
                    (self.status_topic.filter, 1),
                ]
            )

        self.client.on_connect = on_connect
        # Answers published while we are cut off from the broker (a clean session) never reach
        # us: counted, so that they are not taken for the runtime's losses.
        self.cut_off = 0

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, *rest: Any) -> None:
            if not answered.is_set() and not ready.is_set():
                # no CONNACK: a TLS client certificate the broker does not take (TLS 1.3
                # refuses it after the handshake), or no MQTT broker there; paho would try
                # again for ever, and we said "no answer to our subscription" 10 s later
                refused.append(
                    f"ended the connection without answering it as an MQTT broker does "
                    f"({reason}): does it take our client certificate (tls_cert, --tls-cert)?"
                )
                ready.set()
                return
            if reason.is_failure:  # not our own disconnect at close
                with self.lock:
                    self.cut_off += 1

        self.client.on_disconnect = on_disconnect
        if persistent:
            self.client.reconnect_delay_set(0.2, 2)
        if configure:
            configure(self.client)
        start(self.client, url, ready)
        if refused:
            close_client(self.client)
            raise SimError(f"broker {url} {refused[0]}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = None
        runtime = self.status_topic.runtime(msg.topic)
        prediction = self.answers.stream(msg.topic)
        stream = prediction if prediction is not None else self.refusals.stream(msg.topic)
        if not isinstance(doc, dict):
            # An answer no consumer could read is the runtime's fault: kept, to be counted.
            if runtime is None:
                with self.lock:
                    self.unreadable.append((stream or msg.topic, bytes(msg.payload)))
            return
        if runtime is not None:
            runtime = runtime or str(doc.get("runtime_id"))  # a fixed topic: the payload's
            with self.lock:
                self.status[runtime] = str(doc.get("state"))
                self.status_log.append((runtime, doc, now))
            return
        if stream is None:
            return
        with self.lock:
            (self.predictions if prediction is not None else self.errors).append((stream, doc, now))

    def received(self, log: Sequence[Sent], ref: Reference | None = None) -> dict[Key, Got]:
        """(stream, epoch, seq) -> every (y, arrival time) received for it."""
        return answers(self, Truth(log), ref).got

    def wait(self, log: Sequence[Sent], timeout: float, restart_gap: int | None = None) -> None:
        """Until every sample that must be answered has a prediction and every invalid message
        an error (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        truth = Truth(log)
        want = expected_keys(log) - excluded_keys(truth, restart_gap)[0]
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            got = answers(self, truth).got
            if want - set(got) <= excused_keys(self, truth) and not unanswered_invalid(self, log):
                return
            time.sleep(max(0.05, 2 * (time.monotonic() - t0)))

    def wait_online(
        self, runtime_id: str, timeout: float, alive: Any = None, why_ended: Any = None
    ) -> None:
        """``alive()``: whether the runtime's process still runs; ``why_ended()``: what says
        why it ended (e.g. ``Runtime.why_ended``)."""
        deadline = time.monotonic() + timeout
        while self.status.get(runtime_id) != "online":
            if alive is not None and not alive():
                raise SimError(
                    f"the runtime {shown(runtime_id)} ended before it came online"
                    + (f": {why_ended()}" if why_ended else "")
                )
            if time.monotonic() > deadline:
                raise SimError(
                    f"the runtime {shown(runtime_id)} did not come online within {timeout} s"
                )
            time.sleep(0.05)

    def close(self) -> None:
        close_client(self.client)


class Witness:
    """A second subscriber to the sample topics, with its own persistent session: what it
    never receives, the broker never delivered (to anyone). Tells the broker's losses from
    the runtime's."""

    def __init__(self, url: str | Link, client_id: str = "firmware-sim-witness") -> None:
        from .devices import digest

        self.digest = digest
        self.seen: set[bytes] = set()
        self.lock = threading.Lock()
        self.client = new_client(url, client_id, clean_session=False)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        data = Template(link(url).data_topic).filter
        self.client.on_connect = lambda c, *a: c.subscribe(data, 1)
        start(self.client, url, ready)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        d = self.digest(bytes(msg.payload))
        with self.lock:
            self.seen.add(d)

    def witnessed(self) -> set[bytes]:
        with self.lock:
            return set(self.seen)

    def close(self) -> None:
        close_client(self.client)


Got = list[tuple[np.ndarray, float]]
Reference = dict[Key, np.ndarray]


class Truth:
    """Indexes of the ground truth that the attribution of answers needs."""

    def __init__(self, log: Sequence[Sent]) -> None:
        self.log = log
        # handed to the broker, acknowledged or not: one it took before it went away may have
        # reached the runtime without its acknowledgement reaching the device
        self.sent = [m for m in log if m.published is not None]
        self.epochs: dict[tuple[str, int], list[int]] = {}  # (stream, seq) -> epochs, sorted
        self.message_epochs: dict[tuple[str, int], list[int]] = {}  # of messages starting there
        self.sent_at: dict[Key, float] = {}
        self.msg: dict[Key, Sent] = {}  # valid samples sent -> their message
        self.streams = {m.stream for m in log}
        self.epoch_of_boot: dict[tuple[str, int], int] = {}
        self.first_pub: dict[tuple[str, int], float] = {}  # (stream, epoch) -> first publish
        for m in self.sent:
            assert m.published is not None
            if m.boot is not None:
                self.epoch_of_boot[(m.stream, m.boot)] = m.epoch
            at = self.first_pub.get((m.stream, m.epoch))
            if at is None or m.published < at:
                self.first_pub[(m.stream, m.epoch)] = m.published
            if not m.valid:
                continue
            starts = self.message_epochs.setdefault((m.stream, m.seq), [])
            if m.epoch not in starts:
                starts.append(m.epoch)
            for key in m.keys:
                self.sent_at[key] = min(m.published, self.sent_at.get(key, m.published))
                self.msg.setdefault(key, m)
                es = self.epochs.setdefault((key[0], key[2]), [])
                if m.epoch not in es:
                    es.append(m.epoch)
        for es in (*self.epochs.values(), *self.message_epochs.values()):
            es.sort()
        self.starts: dict[str, list[tuple[int, float]]] = {}
        for (stream, e), t in self.first_pub.items():
            self.starts.setdefault(stream, []).append((e, t))

    def epoch(
        self,
        stream: str,
        seq: int,
        at: float,
        boot: Any = None,
        y: np.ndarray | None = None,
        ref: Reference | None = None,
    ) -> int | None:
        """Which boot of its device an answer for (stream, seq) belongs to."""
        if isinstance(boot, int) and (stream, boot) in self.epoch_of_boot:
            return self.epoch_of_boot[(stream, boot)]
        cands = self.epochs.get((stream, seq))
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        if ref is not None and y is not None:
            same = [e for e in cands if np.array_equal(ref.get((stream, e, seq)), y)]
            if len(same) == 1:
                return same[0]
            cands = same or cands
        before = [e for e in cands if self.sent_at[(stream, e, seq)] <= at]
        return before[-1] if before else cands[0]

    def newer_boot_started(self, stream: str, epoch: int, at: float) -> bool:
        """Whether a later boot of the stream had published anything by time ``at``."""
        return any(e > epoch and t <= at for e, t in self.starts.get(stream, ()))


@dataclass
class Answers:
    got: dict[Key, Got] = field(default_factory=dict)
    unexpected: list[tuple[str, int]] = field(default_factory=list)  # rows for no sample sent
    other_streams: int = 0  # prediction messages on streams no simulated device has
    restarts: set[tuple[str, int]] = field(default_factory=set)  # (stream, epoch) flagged
    flagged: list[Key] = field(default_factory=list)  # first sample of each restart answer
    gaps: list[tuple[Key, int]] = field(default_factory=list)  # (first sample, its gap or 0)
    gap_covered: set[Key] = field(default_factory=set)  # samples a prediction's gap skipped
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (stream, what is wrong)


def readable(doc: dict[str, Any]) -> tuple[int, np.ndarray] | str:
    """(seq, rows of y) of a prediction, or what makes it one no consumer can use: such an
    answer stopped the whole score with a traceback (a missing ``y``, a ``seq`` not a number,
    rows of different lengths)."""
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < U32:
        return f"seq {json.dumps(seq)[:40]} is not a u32"
    if "y" not in doc:
        return "no y"
    try:
        y = np.asarray(doc["y"], np.float32)
    except (TypeError, ValueError):
        return f"y {json.dumps(doc['y'])[:60]} is not a vector or rows of numbers"
    if y.ndim not in (1, 2) or y.size == 0:
        return f"y of shape {list(y.shape)} is not a vector or rows of numbers"
    return seq, y.reshape(1, -1) if y.ndim == 1 else y


def answers(scorer: Scorer, truth: Truth, ref: Reference | None = None) -> Answers:
    out = Answers()
    with scorer.lock:
        items = list(scorer.predictions)
        unreadable = list(getattr(scorer, "unreadable", ()))
    for stream, payload in unreadable:
        if stream in truth.streams:
            out.malformed.append((stream, f"not a JSON object: {payload[:40]!r}"))
    for stream, doc, t in items:
        if stream not in truth.streams:
            out.other_streams += 1
            continue
        got = readable(doc)
        if isinstance(got, str):
            out.malformed.append((stream, got))
            continue
        seq0, rows = got
        first: Key | None = None
        for k, row in enumerate(rows):
            seq = (seq0 + k) % U32
            e = truth.epoch(stream, seq, t, doc.get("boot"), row, ref)
            if e is None:
                out.unexpected.append((stream, seq))
                continue
            first = first or (stream, e, seq)
            out.got.setdefault((stream, e, seq), []).append((row, t))
        if first is None:
            continue
        e0 = first[1]
        if doc.get("restart"):
            out.restarts.add((stream, e0))
            out.flagged.append(first)
        gap = doc.get("gap")
        out.gaps.append((first, gap if isinstance(gap, int) else 0))
        if isinstance(gap, int) and 0 < gap < HALF:
            out.gap_covered.update((stream, e0, (seq0 - g) % U32) for g in range(1, gap + 1))
    return out


def boot_order(applied: set[Key], log: Sequence[Sent]) -> tuple[Any, dict[Any, list[int]]]:
    """(offset of a key within its boot, and per boot the sorted offsets of the samples
    ``applied``): a boot's samples in order, by seq counted from its first message on (a
    seq before it, as a runtime may answer wrongly, is negative)."""
    base: dict[tuple[str, int], int] = {}
    for m in sorted(log, key=lambda m: m.created):
        base.setdefault((m.stream, m.epoch), m.seq)

    def offset(k: Key) -> int:
        return (k[2] - base[(k[0], k[1])] + HALF) % U32 - HALF

    order: dict[tuple[str, int], list[int]] = {}
    for k in applied:
        order.setdefault((k[0], k[1]), []).append(offset(k))
    for offsets in order.values():
        offsets.sort()
    return offset, order


def restart_flags(ans: Answers, got: dict[Key, Got], log: Sequence[Sent]) -> tuple[int, list[Key]]:
    """(how many answers say ``restart`` that are not their boot's first, examples): a restart
    is said on the first answer of a boot, a reboot's always, and never after it."""
    offset, order = boot_order(set(got), log)
    spurious = sorted({k for k in ans.flagged if k in got and order[k[:2]][0] != offset(k)})
    return len(spurious), spurious[:5]


def gap_errors(
    ans: Answers, got: dict[Key, Got], want: set[Key], log: Sequence[Sent]
) -> tuple[int, list[Any]]:
    """(how many answers say another ``gap`` than the samples of their boot skipped since the
    one applied before, examples as (key, said, due)): a consumer counts its lost samples by
    it, and the judge excuses losses of the broker with it. Applied: what was answered or was
    due (a missing answer is counted as missing, not as a gap the next one should say)."""
    offset, order = boot_order(set(got) | want, log)
    wrong = set()
    for k, said in ans.gaps:
        if k not in got:
            continue
        offsets, at = order[k[:2]], offset(k)
        i = bisect.bisect_left(offsets, at)
        due = at - offsets[i - 1] - 1 if i else 0
        if said != due:
            wrong.add((k, said, due))
    return len(wrong), sorted(wrong)[:5]


# Error codes about valid samples (a copy of one applied, or one given up on): the others
# answer a message the runtime refused.
NOT_REFUSALS = ("duplicate", "late", "stale")


def unanswered_invalid(scorer: Scorer, log: Sequence[Sent]) -> dict[str, int]:
    """stream -> invalid messages delivered (NaN, garbage, wrong feature count) beyond the
    refusals (errors) its topic got: each is due one, or the device never learns that its
    sample was refused. Counted per stream: garbage is answered without a seq."""
    due = Counter(m.stream for m in log if m.delivered and not m.valid)
    with scorer.lock:
        refused = Counter(s for s, d, _ in scorer.errors if d.get("error") not in NOT_REFUSALS)
    return {s: n - refused[s] for s, n in due.items() if refused[s] < n}


def expected_keys(log: Sequence[Sent]) -> set[Key]:
    return {key for m in log if m.valid and m.delivered for key in m.keys}


def overtaken(log: Sequence[Sent]) -> set[Key]:
    """Ground truth: samples first published after a later sample of their boot."""
    out: set[Key] = set()
    newest: dict[tuple[str, int], int] = {}
    for m in sorted((m for m in log if m.published is not None), key=lambda m: m.published):
        boot = (m.stream, m.epoch)
        if boot in newest and m.seq < newest[boot]:
            out.update(m.keys)
        newest[boot] = max(m.seq, newest.get(boot, m.seq))
    return out


def _claims(scorer: Scorer, code: str) -> list[tuple[str, dict[str, Any], float]]:
    with scorer.lock:
        return [
            (stream, doc, t)
            for stream, doc, t in scorer.errors
            if doc.get("error") == code and isinstance(doc.get("seq"), int)
        ]


def _candidates(truth: Truth, stream: str, doc: dict[str, Any]) -> list[int]:
    """The boots an error about (stream, seq) may be about: a message starting at that seq,
    else one carrying it."""
    boot = doc.get("boot")
    if isinstance(boot, int) and (stream, boot) in truth.epoch_of_boot:
        return [truth.epoch_of_boot[(stream, boot)]]
    key = (stream, doc["seq"])
    return truth.message_epochs.get(key) or truth.epochs.get(key, [])


def _judged(
    scorer: Scorer, truth: Truth, code: str, ignore: set[Key]
) -> Iterator[tuple[str, dict[str, Any], float, list[int]]]:
    """Error claims of ``code`` with the boots they may be about, less samples not to be
    judged (see ``excluded_keys``)."""
    for stream, doc, t in _claims(scorer, code):
        every = _candidates(truth, stream, doc)
        epochs = [e for e in every if (stream, e, doc["seq"]) not in ignore]
        if epochs or not every:
            yield stream, doc, t, epochs


def late_keys(
    scorer: Scorer,
    truth: Truth,
    ignore: set[Key] = frozenset(),  # type: ignore[assignment]
) -> tuple[set[Key], int]:
    """Samples the runtime reported as late (given up on, a later one already applied) that
    really were overtaken on the wire: expected loss. Claims without that are not excused.
    Returns (excused samples, unfounded claims)."""
    behind = overtaken(truth.log)
    excused: set[Key] = set()
    unfounded = 0
    for stream, doc, _, epochs in _judged(scorer, truth, "late", ignore):
        found = False
        for e in epochs:
            m = truth.msg.get((stream, e, doc["seq"]))
            if m is not None and set(m.keys) & behind:
                excused |= set(m.keys) & behind
                found = True
        unfounded += not found
    return excused, unfounded


def stale_keys(
    scorer: Scorer,
    truth: Truth,
    ignore: set[Key] = frozenset(),  # type: ignore[assignment]
) -> tuple[set[Key], int, set[Key]]:
    """Samples of an older boot the runtime refused as ``stale``: right when a newer boot of
    the device had published before the answer came. Returns (excused samples, unfounded
    claims, and those of the excused that were published before the newer boot began: the
    broker had them in order, the runtime took them up only after the newer boot)."""
    excused: set[Key] = set()
    in_order: set[Key] = set()
    unfounded = 0
    for stream, doc, t, epochs in _judged(scorer, truth, "stale", ignore):
        found = False
        for e in epochs:
            m = truth.msg.get((stream, e, doc["seq"]))
            if m is not None and truth.newer_boot_started(stream, e, t):
                excused |= set(m.keys)
                found = True
                if not truth.newer_boot_started(stream, e, (m.published or 0.0) - 1e-9):
                    in_order |= set(m.keys)
        unfounded += not found
    return excused, unfounded, in_order


def stale_expected(truth: Truth) -> int:
    """Valid messages first published after a newer boot of their device had published."""
    return sum(
        1
        for m in truth.sent
        if m.delivered
        and m.valid
        and truth.newer_boot_started(m.stream, m.epoch, (m.published or 0.0) - 1e-9)
    )


def excused_keys(scorer: Scorer, truth: Truth) -> set[Key]:
    return late_keys(scorer, truth)[0] | stale_keys(scorer, truth)[0]


def excluded_keys(truth: Truth, restart_gap: int | None) -> tuple[set[Key], list[str]]:
    """Samples no runtime can be judged on: a device without boot ids rebooted, and the
    runtime could not tell (no ``--restart-gap``, or a seq jump back not beyond it). The
    device's samples from that reboot on are left out, with a reason each."""
    by_boot: dict[tuple[str, int], list[Sent]] = {}
    for m in truth.sent:
        if m.valid:
            by_boot.setdefault((m.stream, m.epoch), []).append(m)
    out: set[Key] = set()
    reasons: list[str] = []
    for stream in sorted({s for s, _ in by_boot}):
        epochs = sorted(e for s, e in by_boot if s == stream)
        last: int | None = None
        for e in epochs:
            msgs = sorted(by_boot[(stream, e)], key=lambda m: m.published or 0.0)
            if e > 0 and last is not None and msgs[0].boot is None:
                back = (last - msgs[0].seq) % U32
                if restart_gap is None or not restart_gap < back <= HALF:  # as the runtime
                    why = (
                        "the runtime has no --restart-gap"
                        if restart_gap is None
                        else f"its seq went back {back}, not more than --restart-gap {restart_gap}"
                    )
                    reasons.append(f"{stream} rebooted without a boot id and {why}")
                    out |= {
                        k
                        for (s, ep), ms in by_boot.items()
                        if s == stream and ep >= e
                        for m in ms
                        for k in m.keys
                    }
                    break
            last = max(k[2] for m in msgs for k in m.keys)
    return out, reasons


def offline(bundle: Path, log: Sequence[Sent], skip: set[Key] = frozenset()) -> Reference:  # type: ignore[assignment]
    """The same bundle fed the delivered samples of each boot of each stream in order, from
    zero state at the first sample of each boot (less ``skip``: messages the runtime rightly
    did not apply, late or stale)."""
    return offline_in(bundle, log, skip, None)[0]


def offline_in(
    bundle: Path, log: Sequence[Sent], skip: set[Key], kernels: str | None
) -> tuple[Reference, str, str | None]:
    """``offline`` computed in the kernel set ``kernels`` (the runtime's; None: this Python's
    default): (reference, kernel set used, why it is not the one asked for, or None)."""
    from . import offline as kernel_run

    msgs = sorted(
        (m for m in log if m.valid and m.delivered and m.keys[0] not in skip),
        key=lambda m: (m.stream, m.epoch, m.created),
    )
    chunks = [(f"{m.stream}#{m.epoch}", m.seq, np.asarray(m.values)) for m in msgs]
    answers, used, why = kernel_run.run(bundle, chunks, kernels)
    out: Reference = {}
    for m, (seq, y) in zip(msgs, answers):
        for k, row in enumerate(y):
            out[(m.stream, m.epoch, (seq + k) % U32)] = row  # type: ignore[operator]
    return out, used, why


def runtime_kernels(scorer: Scorer) -> str | None:
    """The kernel set the runtime(s) said in their status while up (a retained offline status
    may be an older runtime's); None when none said one."""
    with scorer.lock:
        docs = [d for _, d, _ in scorer.status_log if d.get("kernels")]
    up = [d for d in docs if d.get("state") in ("online", "degraded")]
    found = {str(d["kernels"]) for d in up or docs}
    if len(found) > 1:
        raise SimError(
            f"runtimes report different kernel sets ({', '.join(sorted(found))}); "
            "score one runtime at a time or name one with --kernels"
        )
    return found.pop() if found else None


def model_check(scorer: Scorer, truth: Truth, bundle: Path) -> dict[str, Any]:
    """The model id the predictions name against the bundle's: a bundle of the same .tflite
    with other labels answers the same ``y`` (judged exact) under labels of its own."""
    from edge.manifest import read_bundle

    manifest = read_bundle(bundle)[0]
    model = manifest.model_id
    with scorer.lock:
        named = [d.get("model") for s, d, _ in scorer.predictions if s in truth.streams]
    others = Counter(str(m) for m in named if m != model)
    return {
        "bundle_model": model,
        "predictions_other_model": sum(others.values()),
        "other_models": dict(others.most_common(3)),
        **(label_check(scorer, truth, manifest.labels) if manifest.labels else {}),
    }


def label_check(scorer: Scorer, truth: Truth, classes: Sequence[str]) -> dict[str, Any]:
    """Each prediction's ``label`` and ``p`` against its own ``y`` (the top class and its
    value): what most consumers read, and judged by nothing before, ``y`` alone was."""
    with scorer.lock:
        docs = [(s, d) for s, d, _ in scorer.predictions if s in truth.streams]
    bad: list[tuple[str, int, tuple[Any, Any], tuple[Any, Any]]] = []  # (label, p) said, due
    for stream, doc in docs:
        if isinstance(readable(doc), str):
            continue  # counted as malformed
        flat = not isinstance(doc["y"][0], list)
        rows = [doc["y"]] if flat else doc["y"]
        tops = [
            max((i for i, v in enumerate(row) if v is not None), key=lambda i: row[i], default=None)
            for row in rows
        ]
        names = [None if t is None or t >= len(classes) else classes[t] for t in tops]
        ps = [None if t is None else row[t] for row, t in zip(rows, tops)]
        want = (names[0], ps[0]) if flat else (names, ps)
        if (doc.get("label"), doc.get("p")) != want:
            bad.append((stream, doc["seq"], (doc.get("label"), doc.get("p")), want))
    return {"labels_wrong": len(bad), "labels_wrong_examples": bad[:5]}


def latencies_s(got: dict[Key, Got], log: Sequence[Sent]) -> np.ndarray:
    """Publish -> first prediction, in seconds, in the order the samples were published."""
    sent_at = {key: m.published for m in log if m.published for key in m.keys}
    return np.array(
        [
            lat
            for _, lat in sorted(
                (sent_at[k], ys[0][1] - sent_at[k]) for k, ys in got.items() if k in sent_at
            )
        ]
    )


def real_time(latencies_ms: np.ndarray, missing: int) -> dict[str, Any]:
    """Whether the runtime kept real time: nothing missing, and no backlog built up - the last
    tenth of the run answered about as fast (median within 250 ms) as the fastest tenth of its
    first half. Not the first tenth alone: a stream's first sample waits the reorder hold
    (600 ms by default), so the first tenth of a short run was that much slower, and a runtime
    falling 800 ms behind by the end was said to keep up. No latency (nothing answered): no
    verdict, not infinity."""
    first = best = last = kept = None
    if len(latencies_ms):
        tenth = max(1, len(latencies_ms) // 10)
        medians = [
            float(np.median(latencies_ms[k : k + tenth]))
            for k in range(0, max(1, len(latencies_ms) // 2), tenth)
        ]
        first, best = medians[0], min(medians)
        last = float(np.median(latencies_ms[-tenth:]))
        kept = bool(missing == 0 and last <= best + 250)
    return {
        "latency_first_tenth_median_ms": first,
        "latency_early_best_tenth_median_ms": best,
        "latency_last_tenth_median_ms": last,
        "kept_up_real_time": kept,
    }


def score(
    scorer: Scorer,
    log: Sequence[Sent],
    duration: float,
    bundle: Path | None = None,
    classes: Sequence[str] = (),
    float_y: Reference | None = None,
    *,
    restart_gap: int | None = None,
    witnessed: set[bytes] | None = None,
    kernels: str | None = None,
) -> dict[str, Any]:
    """The figures of a run. ``restart_gap``: the runtime's ``--restart-gap`` (how it can
    notice a reboot of a device without boot ids). ``witnessed``: digests of every message a
    separate subscriber saw at the broker, to tell what the broker lost from what the runtime
    lost. ``kernels``: the kernel set the offline run computes with; default: the one the
    runtime reported in its status, so a device install is judged by its own bits."""
    truth = Truth(log)
    excluded, reasons = excluded_keys(truth, restart_gap)
    late, unfounded = late_keys(scorer, truth, excluded)
    stale, stale_unfounded, stale_in_order = stale_keys(scorer, truth, excluded)
    want = expected_keys(log) - late - stale - excluded
    # A sample that was predicted was applied: a late or stale answer to it was about a later
    # copy (a redelivery), so the reference must apply it too.
    applied = set(answers(scorer, truth).got)
    ref, ref_kernels, ref_note = None, None, None
    runtime = runtime_kernels(scorer) if bundle is not None else None
    if bundle is not None:
        ref, ref_kernels, ref_note = offline_in(
            bundle, log, (late | stale) - applied, kernels or runtime
        )
    ans = answers(scorer, truth, ref)
    got = {k: ys for k, ys in ans.got.items() if k not in excluded}  # not to be judged
    labels = {
        key: int(lab) for m in log if m.labels is not None for key, lab in zip(m.keys, m.labels)
    }
    faults = Counter(f for m in log for f in m.faults)
    invalid_delivered = sum(1 for m in log if m.delivered and not m.valid)
    latencies = latencies_s(got, log)
    missing = want - set(got)
    broker_lost: set[Key] = set()
    if witnessed is not None:
        broker_lost = {
            k for k in missing if truth.msg[k].wire not in witnessed and k in ans.gap_covered
        }
    with scorer.lock:
        codes = Counter(str(doc.get("error")) for _, doc, _ in scorer.errors)
    reboots_seen = {(m.stream, m.epoch) for m in log if m.delivered and m.valid and m.epoch > 0}
    # handed to the broker, never acknowledged: it went away (answers to them are no surprise)
    unacked = [m for m in log if m.published is not None and not m.delivered]
    unacked_keys = {k for m in unacked for k in m.keys}
    # predictions for samples that should have none (never sent, invalid, not delivered)
    unwanted = set(got) - want - late - stale - unacked_keys
    answered_reboots = {k[:2] for k in got} & reboots_seen
    spurious = restart_flags(ans, got, log)
    gaps = gap_errors(ans, got, want, log)
    unanswered = unanswered_invalid(scorer, log)
    r: dict[str, Any] = {
        "devices": len({m.stream for m in log}),
        "messages_created": len(log),
        "messages_delivered": sum(m.delivered for m in log),
        "messages_not_delivered": len(unacked),  # the broker did not acknowledge them
        "samples_delivered_valid": len(want),
        "faults_injected": dict(faults),
        "predictions_received": len(got),
        "predictions_missing": len(missing),
        "lost_by_broker": len(broker_lost),
        "lost": len(missing - broker_lost),
        # times the scorer lost its broker: what was answered meanwhile never reached it
        "scorer_cut_off_from_broker": int(getattr(scorer, "cut_off", 0)),
        "late_beyond_reorder_window": len(late),
        "late_claims_unfounded": unfounded,
        "stale": len(stale),
        "stale_messages_expected": stale_expected(truth),
        # excused as the contract has it, but these reached the broker before the newer boot
        "stale_published_before_newer_boot": len(stale_in_order),
        "stale_in_order_never_predicted": 0,  # filled in below, once answers are attributed
        "stale_in_order_examples": sorted(stale_in_order)[:5],
        "stale_claims_unfounded": stale_unfounded,
        "restarts": len(ans.restarts & reboots_seen),
        "restarts_expected": len(reboots_seen - {(k[0], k[1]) for k in excluded}),
        # reboots answered (an answer of theirs received) without a restart on any answer
        "restarts_missing": len(answered_reboots - ans.restarts),
        "restarts_missing_examples": sorted(answered_reboots - ans.restarts)[:5],
        "restarts_spurious": spurious[0],
        "restarts_spurious_examples": spurious[1],
        # answers whose gap is not the samples of their boot skipped since the one before
        "gaps_wrong": gaps[0],
        "gaps_wrong_examples": gaps[1],
        "missing_examples": sorted(missing - broker_lost)[:5],
        "duplicate_predictions": sum(len(v) - 1 for v in got.values()),
        # one sample answered twice with different values: the runtime contradicts itself
        "inconsistent_predictions": sum(
            any(not np.array_equal(ys[0][0], y) for y, _ in ys[1:]) for ys in got.values()
        ),
        "unexpected_predictions": len(ans.unexpected) + len(unwanted),
        "unexpected_examples": sorted(ans.unexpected)[:3] + sorted(unwanted)[:3],
        "predictions_other_streams": ans.other_streams,
        # answers of the devices' streams that are no prediction a consumer could read
        "malformed_answers": len(ans.malformed),
        "malformed_examples": ans.malformed[:5],
        "excluded_samples": len(excluded),
        "excluded_reasons": reasons[:5],
        "errors_received": len(scorer.errors),
        "errors_by_code": dict(codes),
        "errors_expected_at_least": invalid_delivered,
        # invalid messages delivered that no error answered (per stream: refusals < messages)
        "invalid_unanswered": sum(unanswered.values()),
        "invalid_unanswered_examples": sorted(unanswered)[:5],
        "duration_s": duration,
        "throughput_predictions_per_s": len(got) / duration if duration else 0.0,
    }
    never = stale_in_order - set(got)
    r["stale_in_order_never_predicted"] = len(never)
    r["stale_in_order_examples"] = sorted(never or stale_in_order)[:5]
    if len(latencies):
        p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99])
        r.update(latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99)
    r.update(real_time(latencies * 1000, r["predictions_missing"]))
    if ref is not None:
        r["runtime_kernels"] = runtime or "not reported"
        r["offline_kernels"] = ref_kernels
        if ref_note:
            r["offline_kernels_note"] = ref_note
        diffs = [  # a row of another width is wrong (below), not a difference to measure
            float(np.abs(ys[0][0] - ref[k]).max())
            for k, ys in got.items()
            if k in ref and ys[0][0].shape == ref[k].shape
        ]
        wrong = [
            k
            for k, ys in got.items()
            if k in ref and any(not np.array_equal(y, ref[k]) for y, _ in ys)
        ]
        r["wrong_predictions"] = len(wrong)
        r["wrong_examples"] = wrong[:5]
        # Predictions the offline run computed nothing for (it refused the samples: a bundle
        # of another feature count) are judged by nothing: the verdict said EXACT for them.
        unjudged = sorted(k for k in got if k in want and k not in ref)
        r["predictions_not_compared"] = len(unjudged)
        r["not_compared_examples"] = unjudged[:5]
        if bundle is not None:  # as it is wherever there is a reference
            r.update(model_check(scorer, truth, bundle))
        r["max_abs_diff_vs_offline"] = max(diffs) if diffs else None  # none compared: no figure
        if labels:
            keys = [k for k in got if k in labels and k in ref]
            truth_labels = np.array([labels[k] for k in keys])
            r["accuracy_runtime"] = (
                float(np.mean([got[k][0][0].argmax() == labels[k] for k in keys])) if keys else None
            )
            r["accuracy_offline"] = (
                float(np.mean([ref[k].argmax() == t for k, t in zip(keys, truth_labels)]))
                if keys
                else None
            )
            if float_y is not None:
                fk = [k for k in keys if k in float_y]
                r["agreement_with_float"] = (
                    float(np.mean([got[k][0][0].argmax() == float_y[k].argmax() for k in fk]))
                    if fk
                    else None
                )
    r["classes"] = list(classes)
    return r


def table(r: dict[str, Any]) -> str:
    rows = []
    for key, value in r.items():
        if key in ("classes",) or (key.endswith(("_examples", "_reasons")) and not value):
            continue
        if value is None:
            value = "n/a (nothing to measure)"
        elif isinstance(value, float):
            value = f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
        rows.append(f"  {key.replace('_', ' '):34s} {value}")
    return "\n".join(rows)


def save(r: dict[str, Any], scorer: Scorer, log: Sequence[Sent], out: Path) -> tuple[Path, str]:
    """score.json first (so a missing plotting library or a plot that cannot be written never
    costs the score), then score.png; returns score.json's path and score.png's, or why there
    is none (matplotlib not installed, a full disk): an earlier run's score.png is removed
    then, or it would be read as this run's."""
    from . import plots
    from .results import replace_file
    from .verdict import verdict

    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "score.json", out / "score.png"
    text = json.dumps(r, indent=2, default=str) + "\n"
    replace_file(jpath, lambda tmp: tmp.write_text(text))
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        return jpath, _no_plot(ppath, PLOT_SKIPPED)
    got = scorer.received(log)
    lat = latencies_s(got, log) * 1000
    labelled = bool(r.get("classes"))
    predicted = {k: (int(ys[0][0].argmax()) if labelled else None) for k, ys in got.items()}
    pct = {
        k[len("latency_") : -len("_ms")]: r[k]
        for k in ("latency_p50_ms", "latency_p99_ms")
        if k in r
    }
    grid = plots.stream_grid(log, predicted)
    try:
        replace_file(ppath, lambda tmp: plots.plot_score(tmp, lat, grid, verdict(r), pct))
    except SimError as exc:  # the score is written: the run's outcome stands without its plot
        return jpath, _no_plot(ppath, f"not written: {exc}")
    return jpath, str(ppath)


def _no_plot(path: Path, why: str) -> str:
    """``why``, once an earlier run's plot at ``path`` is gone."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        return f"{why}; an earlier {path.name} is still there: {exc.strerror}"
    return why


PLOT_SKIPPED = "skipped: matplotlib is not installed (pip install 'edge-lstm[sim]')"
