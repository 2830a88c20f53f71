"""convert: trained Keras or ONNX LSTM -> verified int8 TFLite step model (desktop side, needs
TensorFlow).

Modules, in pipeline order: ``intake`` (read and check the Keras model into a ``spec``, the
framework-free list of per-step layers; ``onnx_intake`` the same for ONNX models, whose
original graph in onnxruntime is then the float reference), ``reference`` (NumPy golden
step), ``step_graph`` (the one-step TF function), ``quantize`` (calibration and the TFLite
converter), ``verify`` (fidelity, drift, op audit, interpreters), ``verdict`` (task metrics,
gates, advice), ``bundle`` (atomic output directory and manifest). ``datasets`` and ``train``
serve the example model.
"""

from edge._version import __version__

__all__ = ["__version__"]
