"""``convert`` and ``verify`` end to end: validate inputs, convert, verify, write atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeError, shown
from edge.manifest import read_bundle

from . import bundle, cell_range, intake, quantize, verdict, verify
from .datasets import input_file, load_array
from .errors import ConvertError
from .spec import ModelSpec

Progress = Callable[[str], None]
AUTO_ORDER = quantize.AUTO_ORDER  # smallest file first
# The largest input magnitude accepted. The integer input scale follows the range calibration
# sees (about range / 255 for int8): one value of 1e36 or 3e38 makes TFLite's interpreter abort
# the whole process when it prepares the model (no exception to catch), while 1e30 converts.
# Far beyond any sensor's units; float64 values past float32's range are caught here too.
MAX_INPUT_MAGNITUDE = 1e30
# Names a SenML pack gives the runtime's own records (edge.payloads.decode_senml), not features.
SENML_RECORDS = {"seq": "sequence number", "boot": "boot id"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_sequences(
    path: str | Path, features: int, what: str, with_labels: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, T, F] float32 sequences (and optional labels ``y`` from an .npz, unless
    ``with_labels`` is False: calibration reads none), checked."""
    p = input_file(path, f"{what} ")
    try:
        x = load_array(p)
        labels = None
        if p.suffix == ".npz" and with_labels:
            with np.load(p, allow_pickle=False) as z:
                has_labels = "y" in z.files
            labels = load_array(p, "y") if has_labels else None
    except ValueError as exc:
        raise ConvertError(f"{what} {exc}") from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise ConvertError(f"{what} {p}: dtype {x.dtype}, expected float32 [N, T, F]")
    if x.ndim != 3 or x.shape[-1] != features or 0 in x.shape:
        raise ConvertError(f"{what} {p}: shape {list(x.shape)}, expected [N, T, {features}]")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ConvertError(f"{what} {p}: contains NaN or Inf (first at index {bad})")
    # against the bound as float32 holds it, so that a float32 1e30 (1.0000000150e30) passes
    if (largest := float(np.abs(x).max())) > float(np.float32(MAX_INPUT_MAGNITUDE)):
        at = np.unravel_index(int(np.abs(x).argmax()), x.shape)
        raise ConvertError(
            f"{what} {p}: largest magnitude {largest:.3g} (at index {list(map(int, at))}) is "
            f"beyond {MAX_INPUT_MAGNITUDE:g}, more than int8/int16 input quantisation can scale"
        )
    return x.astype(np.float32), labels


def read_model(path: str | Path) -> tuple[ModelSpec, verify.FloatModel | None, Any]:
    """The spec of a Keras or ONNX model; for ONNX the model itself as the float reference
    (onnxruntime over the original graph); for Keras the Keras model (to check the spec)."""
    if Path(path).suffix.lower() == ".onnx":
        from . import onnx_intake

        source = onnx_intake.read(path)
        return source.spec, source, None
    spec, keras_model = intake.read(path)
    return spec, None, keras_model


def check_source(
    spec: ModelSpec,
    float_model: verify.FloatModel | None,
    keras_model: Any,
    calib: np.ndarray,
    progress: Progress,
) -> None:
    """The model must compute what was read from it (exit 2 otherwise): an ONNX graph in
    onnxruntime, a Keras model in Keras."""
    from . import onnx_intake

    if isinstance(float_model, onnx_intake.OnnxSource):
        float_model.check_agreement(calib[: onnx_intake.AGREEMENT_SEQUENCES])
    elif keras_model is not None and (warning := intake.check_agreement(keras_model, spec, calib)):
        progress(f"warning: {warning}")


def check_labels(
    labels: np.ndarray, data: np.ndarray, spec: ModelSpec, *, classifier: bool
) -> None:
    """The labels of ``--data`` as the verdict will read them: their shape, and for a
    classifier every value a class of the model (exit 2 before converting, not after)."""
    kind = "classifier" if classifier or spec.final_activation == "softmax" else "regressor"
    n, t, _ = data.shape
    where = verdict.label_alignment(labels, kind, n, t, spec.outputs, spec.sequence_output)
    if kind == "classifier":
        verdict.class_index(labels, where, spec.outputs)


def run_convert(
    model_path: str | Path,
    calib_path: str | Path,
    out: str | Path,
    *,
    mode: str = "int8",
    labels: list[str] | None = None,
    sample_rate_hz: float | None = None,
    feature_names: list[str] | None = None,
    data_path: str | Path | None = None,
    normalization: str = "runtime",
    targets: verdict.Targets | None = None,
    per_channel: bool = False,
    progress: Progress = _stderr,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    targets = targets or verdict.Targets()
    if mode not in (*quantize.MODES, "auto"):
        raise ConvertError(f"--quant {shown(mode)} is not one of {', '.join(quantize.MODES)}, auto")
    if normalization not in ("runtime", "graph"):
        raise ConvertError(f"--normalization {shown(normalization)} is not 'runtime' or 'graph'")
    if sample_rate_hz is not None and not 0 < sample_rate_hz < math.inf:
        raise ConvertError(f"--sample-rate {sample_rate_hz} must be a finite number > 0")
    for name in feature_names or []:
        if name in SENML_RECORDS:
            raise ConvertError(
                f"--feature-names: {shown(name)} names SenML's {SENML_RECORDS[name]} record, so a "
                "device could never send that feature in SenML: name it otherwise"
            )
    bundle.check_replaceable(Path(out).resolve())  # again when staging; here before slow work
    dev_python = verify.device_python()  # a bad EDGE_LSTM_DEVICE_PYTHON: said before, too
    progress(f"reading {model_path}")
    spec, float_model, keras_model = read_model(model_path)
    if feature_names is not None and len(feature_names) != spec.features:
        raise ConvertError(
            f"--feature-names has {len(feature_names)} names for {spec.features} features"
        )
    if labels is not None and len(labels) != spec.outputs:
        raise ConvertError(f"--labels has {len(labels)} labels for {spec.outputs} outputs")
    if labels is not None and spec.outputs == 1:
        raise ConvertError(
            f"--labels {shown(labels[0])}: a model of one output has no classes to choose between "
            "(its top class is always the first); a sigmoid output is judged as a regressor "
            "against 0/1 targets: convert it without --labels"
        )
    if normalization == "graph" and spec.norm_mean is None:
        progress(
            "note: --normalization graph changes nothing: the model has no leading "
            "Normalization layer"
        )
    if per_channel and mode in ("float16", "float32"):
        progress(f"note: --per-channel changes nothing in {mode}: it sets integer weight scales")
    calib, _ = load_sequences(calib_path, spec.features, "--calib", with_labels=False)
    data, data_labels = (
        load_sequences(data_path, spec.features, "--data") if data_path else (calib, None)
    )
    check_source(spec, float_model, keras_model, calib, progress)
    in_graph = normalization == "graph"
    if data_labels is not None:  # bad labels are a usage error, before the slow part
        check_labels(data_labels, data, spec, classifier=bool(labels))
    progress(
        f"calibrating on {calib.shape[0]} sequences x {calib.shape[1]} steps "
        "(and their concatenation)"
    )
    names = feature_names or [f"f{i}" for i in range(spec.features)]
    tried: list[dict[str, Any]] = []
    with bundle.staging(Path(out)) as tmp:
        report: dict[str, Any] | None = None
        for m in AUTO_ORDER if mode == "auto" else (mode,):
            if (unfit := quantize.unfit(spec, m)) is not None:
                if mode != "auto":
                    raise ConvertError(f"--quant {unfit} (--quant auto picks a mode that fits)")
                tried.append(
                    {"mode": m, "passed": False, "why": unfit, "failed": [], "skipped": True}
                )
                continue
            cal = quantize.calibrate(
                spec,
                calib,
                normalize_in_graph=in_graph,
                search_c_range=m.startswith("int8"),
                regime=targets.regime,
            )
            progress(f"converting to {m}")

            def write(cal: quantize.Calibration, m: str = m) -> Path:
                """The bundle of ``cal`` in ``tmp``, verified or not."""
                content = quantize.convert(
                    spec, cal, m, normalize_in_graph=in_graph, per_channel=per_channel
                )
                manifest = bundle.describe(
                    content,
                    spec,
                    mode=m,
                    normalize_in_graph=in_graph,
                    labels=labels or [],
                    feature_names=names,
                    feature_units=[""] * spec.features,
                    sample_rate_hz=sample_rate_hz,
                )
                for old in tmp.iterdir():
                    old.unlink()
                (tmp / bundle.MODEL_NAME).write_bytes(content)
                bundle.write_manifest(tmp, manifest)
                return tmp

            cells: cell_range.Choice | None = None
            try:
                if m in cell_range.MODES and any(s.role == "c" for s in spec.states):
                    progress("  choosing the int8 cell-state range on the int8 graph")
                    cells = cell_range.choose(spec, cal, calib, write, regime=targets.regime)
                    progress(f"  {cells.said()}")
                    cal = dataclasses.replace(cal, ranges=cells.ranges)
                manifest, content = read_bundle(write(cal))
            except (ConvertError, EdgeError) as exc:
                if mode != "auto":
                    raise
                tried.append({"mode": m, "passed": False, "why": str(exc)})
                continue
            progress("verifying")
            try:
                report = verify.verify(
                    tmp,
                    spec,
                    data,
                    data_labels,
                    targets=targets,
                    dev_python=dev_python,
                    progress=progress,
                    float_model=float_model,
                )
            except EdgeError as exc:  # e.g. an interpreter without a kernel for this mode
                if mode != "auto":
                    raise
                tried.append({"mode": m, "passed": False, "why": str(exc), "failed": ["runs"]})
                report = None
                continue
            if cells is not None:
                report["cell_state_range"] = cells.describe()
            failed = [k for k, v in report["checks"].items() if not v]
            tried.append(
                {
                    "mode": m,
                    "passed": not failed and not verify.hard_failures(report),
                    "tflite_bytes": len(content),
                    "failed": failed,
                    "why": "; ".join(
                        line.split(": try")[0].split("; ")[0]
                        for line in report["advice"][: len(failed)]
                    ),
                }
            )
            if tried[-1]["passed"]:
                break
        if report is None:
            raise ConvertError(f"no mode could be converted: {auto_reason(tried)}")
        if mode == "auto":
            report["auto"] = {"chosen": report["quantization"], "tried": tried}
            report["advice"] = [auto_reason(tried), *auto_lines(tried), *report["advice"]]
        report["verified_on"] = "held-out data" if data_path else "calibration data"
        report["bundle"] = str(Path(out))
        verify.raise_on_hard_failures(report)
        report["convert_seconds"] = time.perf_counter() - t0
        fidelity = verify.fidelity_summary(report)
        interp = {
            k: v.get("version", v["status"])
            for k, v in report["interpreters"].items()
            if v["status"] == "passed"
        }
        extra = dict(manifest.extra)
        extra["source"] = report["source"]
        if mode == "auto":
            extra["quantization_choice"] = report["advice"][0]
        kern = {k: v for k, v in report["kernel_sets"].items() if k != "unavailable"}
        manifest = dataclasses.replace(
            manifest, fidelity=fidelity, interpreters=interp, extra=extra, kernels=kern
        )
        bundle.write_manifest(tmp, manifest)
        verify.save(report, tmp)
    return report


def auto_reason(tried: list[dict[str, Any]]) -> str:
    """One line: which mode ``--quant auto`` chose, and why the smaller ones were not it."""
    last = tried[-1]
    before = "; ".join(
        f"{t['mode']} {'skipped' if t.get('skipped') else 'failed'}: "
        f"{t['why'].split(': ', 1)[-1] if t.get('skipped') else t['why'] or ', '.join(t['failed'])}"
        for t in tried[:-1]
    )
    if last["passed"]:
        head = f"--quant auto chose {last['mode']}, the smallest mode meeting every target"
    else:
        head = f"--quant auto: no mode met every target; kept {last['mode']}, the most faithful"
    return head + (f" ({before})" if before else "")


def auto_lines(tried: list[dict[str, Any]]) -> list[str]:
    """One line per mode ``--quant auto`` tried: passed, or the check that failed and why."""
    return [
        f"  tried {t['mode']}: "
        + (
            "passed"
            if t["passed"]
            else f"skipped ({t['why']})"
            if t.get("skipped")
            else f"failed {', '.join(t.get('failed', [])) or 'to convert'}: {t['why']}"
        )
        for t in tried
    ]


def run_verify(
    directory: str | Path,
    model_path: str | Path,
    data_path: str | Path,
    *,
    targets: verdict.Targets | None = None,
    progress: Progress = _stderr,
) -> dict[str, Any]:
    d = Path(directory)
    manifest, _ = read_bundle(d)
    dev_python = verify.device_python()
    spec, float_model, keras_model = read_model(model_path)
    if manifest.source_sha256 and spec.source_sha256 != manifest.source_sha256:
        raise ConvertError(f"{model_path}: sha256 differs from the bundle's source model")
    data, labels = load_sequences(data_path, spec.features, "--data")
    if labels is not None:
        check_labels(labels, data, spec, classifier=manifest.output_kind == "classifier")
    check_source(spec, float_model, keras_model, data, progress)
    report = verify.verify(
        d,
        spec,
        data,
        labels,
        targets=targets,
        dev_python=dev_python,
        progress=progress,
        float_model=float_model,
    )
    return report


def summary(report: dict[str, Any]) -> str:
    par, dr = report["parity"], report["drift"]
    lines = [
        f"bundle {report['bundle']} ({report['quantization']}, {report['tflite_bytes']} bytes)"
    ]
    src = report.get("source", {})
    if src.get("format") == "onnx":
        lines.append(
            f"  source   ONNX, input {src['input_layout']}; float reference: "
            f"{src['float_reference']}"
            + (
                "; many-to-one (the last step)"
                if src.get("output", "").startswith("the last")
                else ""
            )
        )
        if src.get("state"):
            lines.append(f"  state    {src['state']}")
    if "rmse_ratio" in par:
        lines.append(
            f"  task     RMSE vs targets ({par['labels']}): float {par['rmse_float']:.4g}  "
            f"bundle {par['rmse_bundle']:.4g}  ratio {par['rmse_ratio']:.4f}"
        )
    if "accuracy_float" in par:
        lines.append(
            f"  task     accuracy ({par['labels']}): float {par['accuracy_float']:.2%}  "
            f"bundle {par['accuracy_bundle']:.2%}"
        )
    lines.append(
        f"  parity   max|dy| {par['max_abs_error']:.4g}  mean|dy| {par['mean_abs_error']:.4g}"
        + (f"  top-1 agreement {par['top1_agreement']:.4%}" if "top1_agreement" in par else "")
        + (
            f"  RMSE vs float {par['rmse_vs_float_rel']:.3%} of std"
            if "rmse_vs_float_rel" in par
            else ""
        )
    )
    lines.append(
        f"  drift    {dr['steps']} steps  first 10% {dr['first_10pct_mean_error']:.4g}  "
        f"last 10% {dr['last_10pct_mean_error']:.4g}  ratio {dr['drift_ratio']:.3f} "
        f"(last vs 2nd 10%: {dr['drift_ratio_steady']:.3f})"
        + (f"  top-1 {dr['top1_agreement']:.4%}" if "top1_agreement" in dr else "")
        + (
            " (reported; gated with --regime continuous)"
            if "top1_agreement" in dr and "long_stream_top1_agreement" not in report["checks"]
            else ""
        )
    )
    sat = ", ".join(f"{k} {v['clipped']:.3%}" for k, v in report.get("saturation", {}).items() if v)
    if sat:
        lines.append(f"  clipped on --data  {sat}")
    limit = report.get("targets", {}).get("max_saturation")
    over = [
        f"{k} {v['clipped']:.3%}"
        for k, v in report.get("saturation", {}).items()
        # an int8 cell state clips by the converter's choice of its range (quantize.py)
        if v and limit is not None and v["clipped"] > limit and v.get("role") != "c"
    ]
    if over:
        lines.append(
            f"  warning  clipped beyond --max-saturation {limit:.3%}: {', '.join(over)}: "
            "the calibration data does not cover --data; calibrate on data spanning the "
            "operating range"
        )
    ops = ", ".join(f"{k} v{v['version']}" for k, v in report["op_audit"]["ops"].items())
    lines.append(f"  ops      {ops}")
    lines.append(
        "  interpreters  "
        + ", ".join(
            f"{k}: {v['status']}" + (f" {v['version']}" if "version" in v else "")
            for k, v in report["interpreters"].items()
        )
    )
    kern = report.get("kernel_sets", {})
    for name, v in kern.get("sets", {}).items():
        d = v["vs_reference"]
        lines.append(
            f"  kernels  {name} ({v['interpreter']}): {'verified' if v['passed'] else 'FAILED'}, "
            + (
                "reference"
                if name == kern["reference"]
                else "bit-identical to the reference"
                if d["bit_identical"]
                else f"max |dy| {d['max_output_diff']:g} output steps from the reference "
                f"({d['differing_outputs']:.0%} of outputs differ)"
            )
        )
    for name, why in kern.get("unavailable", {}).items():
        lines.append(f"  kernels  {name}: not run ({why})")
    lines.append(
        "  checks   "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items())
    )
    lines += [f"  {line}" for line in report.get("advice", [])]
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2)
