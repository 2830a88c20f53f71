"""A structural check of a ``.tflite`` flatbuffer, in pure Python, before any interpreter reads it.

tflite-runtime 2.14 reads a model's flatbuffer without verifying it: an offset past the end of a
file cut off, or a vtable overwritten, is followed wherever it points. This check walks every
table, vtable, vector and string of the TFLite schema the interpreter reads (the options tables
of operators and quantisation as tables: header, vtable and inline size) and every index
between them (tensors, buffers, operator codes, subgraphs), and names the first that is out of
bounds. It is a fast first gate with a message saying what is wrong where; the guarantee that a
damaged model cannot crash a process is ``edge.trial_load``, which runs after it.

Field numbers are those of TensorFlow Lite's ``schema.fbs`` (a field a model does not hold is
absent from its vtable, so older and newer models read alike).
"""

from __future__ import annotations

import struct

# (field, name, kind): "u8" ... "u64" a scalar of that size; "str" a string; "vN" a vector of N-byte
# scalars; "t:Name" a table; "vt:Name" a vector of tables; "any" a table of a union (checked
# as a table of unknown fields).
SCHEMA: dict[str, tuple[tuple[int, str, str], ...]] = {
    "Model": (
        (0, "version", "u32"),
        (1, "operator_codes", "vt:OperatorCode"),
        (2, "subgraphs", "vt:SubGraph"),
        (3, "description", "str"),
        (4, "buffers", "vt:Buffer"),
        (5, "metadata_buffer", "v4"),
        (6, "metadata", "vt:Metadata"),
        (7, "signature_defs", "vt:SignatureDef"),
    ),
    "OperatorCode": (
        (0, "deprecated_builtin_code", "u8"),
        (1, "custom_code", "str"),
        (2, "version", "u32"),
        (3, "builtin_code", "u32"),
    ),
    "SubGraph": (
        (0, "tensors", "vt:Tensor"),
        (1, "inputs", "v4"),
        (2, "outputs", "v4"),
        (3, "operators", "vt:Operator"),
        (4, "name", "str"),
    ),
    "Tensor": (
        (0, "shape", "v4"),
        (1, "type", "u8"),
        (2, "buffer", "u32"),
        (3, "name", "str"),
        (4, "quantization", "t:QuantizationParameters"),
        (5, "is_variable", "u8"),
        (6, "sparsity", "t:SparsityParameters"),
        (7, "shape_signature", "v4"),
        (8, "has_rank", "u8"),
        (9, "variant_tensors", "vt:VariantSubType"),
    ),
    "QuantizationParameters": (
        (0, "min", "v4"),
        (1, "max", "v4"),
        (2, "scale", "v4"),
        (3, "zero_point", "v8"),
        (4, "details_type", "u8"),
        (5, "details", "any"),
        (6, "quantized_dimension", "u32"),
    ),
    "SparsityParameters": (
        (0, "traversal_order", "v4"),
        (1, "block_map", "v4"),
        (2, "dim_metadata", "vt:DimensionMetadata"),
    ),
    "DimensionMetadata": (
        (0, "format", "u8"),
        (1, "dense_size", "u32"),
        (2, "array_segments_type", "u8"),
        (3, "array_segments", "any"),
        (4, "array_indices_type", "u8"),
        (5, "array_indices", "any"),
    ),
    "VariantSubType": (
        (0, "shape", "v4"),
        (1, "type", "u8"),
        (2, "has_rank", "u8"),
    ),
    "Operator": (
        (0, "opcode_index", "u32"),
        (1, "inputs", "v4"),
        (2, "outputs", "v4"),
        (3, "builtin_options_type", "u8"),
        (4, "builtin_options", "any"),
        (5, "custom_options", "v1"),
        (6, "custom_options_format", "u8"),
        (7, "mutating_variable_inputs", "v1"),
        (8, "intermediates", "v4"),
        (9, "large_custom_options_offset", "u64"),
        (10, "large_custom_options_size", "u64"),
        (11, "builtin_options_2_type", "u8"),
        (12, "builtin_options_2", "any"),
    ),
    "Buffer": (
        (0, "data", "v1"),
        (1, "offset", "u64"),
        (2, "size", "u64"),
    ),
    "Metadata": (
        (0, "name", "str"),
        (1, "buffer", "u32"),
    ),
    "SignatureDef": (
        (0, "inputs", "vt:TensorMap"),
        (1, "outputs", "vt:TensorMap"),
        (2, "signature_key", "str"),
        (3, "deprecated_tag", "str"),
        (4, "subgraph_index", "u32"),
    ),
    "TensorMap": (
        (0, "name", "str"),
        (1, "tensor_index", "u32"),
    ),
}
SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
MAX_DEPTH = 64  # tables within tables: the schema has 5 levels; a loop of offsets is damage
MAX_TABLES = 1 << 22  # a bound on the walk of a file whose offsets point back at each other


class Damaged(Exception):
    """What is wrong, and where: the message of the ``BundleError`` the caller raises."""


class _Table:
    def __init__(self, check: _Check, pos: int, where: str, name: str = "") -> None:
        self.check, self.pos, self.where = check, pos, where
        self.names = {field: fname for field, fname, _ in SCHEMA.get(name, ())}
        vt = pos - check.i32(pos, where)
        vt_size = check.u16(vt, f"{where}'s vtable")
        self.size = check.u16(vt + 2, f"{where}'s vtable")
        if vt_size < 4 or vt_size % 2:
            raise Damaged(f"{where}'s vtable at byte {vt} has an impossible size {vt_size}")
        check.span(vt, vt_size, f"{where}'s vtable")
        if self.size < 4:
            raise Damaged(f"{where} at byte {pos} has an impossible size {self.size}")
        check.span(pos, self.size, where)
        self.slots = [check.u16(vt + 4 + 2 * i, where) for i in range((vt_size - 4) // 2)]

    def field(self, field: int) -> str:
        """How a message names a field: by its schema name where known."""
        name = self.names.get(field)
        return f"{self.where}.{name}" if name else f"{self.where}'s field {field}"

    def at(self, field: int, size: int) -> int | None:
        """Where field ``field`` of ``size`` bytes is, or None when the table does not hold it."""
        off = self.slots[field] if field < len(self.slots) else 0
        if not off:
            return None
        if off < 4 or off + size > self.size:
            raise Damaged(
                f"{self.field(field)} lies outside its table's {self.size} bytes (at byte "
                f"{self.pos})"
            )
        return self.pos + off

    def scalar(self, field: int, fmt: str, default: int = 0) -> int:
        p = self.at(field, struct.calcsize(fmt))
        return default if p is None else int(struct.unpack_from("<" + fmt, self.check.data, p)[0])

    def ref(self, field: int) -> int | None:
        """The position an offset field points at, or None."""
        p = self.at(field, 4)
        if p is None:
            return None
        target = p + self.check.u32(p, self.field(field))
        if target >= len(self.check.data):
            raise Damaged(
                f"{self.field(field)} points to byte {target}, past the end of the "
                f"{len(self.check.data)}-byte file"
            )
        return target


class _Check:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.tables = 0

    def span(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or pos + size > len(self.data):
            raise Damaged(
                f"{what} (bytes {pos} to {pos + size}) runs past the end of the "
                f"{len(self.data)}-byte file"
            )

    def u16(self, pos: int, what: str) -> int:
        self.span(pos, 2, what)
        return int(struct.unpack_from("<H", self.data, pos)[0])

    def u32(self, pos: int, what: str) -> int:
        self.span(pos, 4, what)
        return int(struct.unpack_from("<I", self.data, pos)[0])

    def i32(self, pos: int, what: str) -> int:
        self.span(pos, 4, what)
        return int(struct.unpack_from("<i", self.data, pos)[0])

    def vector(self, pos: int, elem: int, what: str) -> int:
        """The length of the vector at ``pos`` of ``elem``-byte elements, once it fits."""
        n = self.u32(pos, what)
        self.span(pos + 4, n * elem, f"{what} of {n} elements")
        return n

    def ints(self, pos: int | None, what: str) -> list[int]:
        if pos is None:
            return []
        n = self.vector(pos, 4, what)
        return list(struct.unpack_from(f"<{n}i", self.data, pos + 4))

    def table(self, pos: int, name: str, where: str, depth: int) -> _Table:
        self.tables += 1
        if depth > MAX_DEPTH or self.tables > MAX_TABLES:
            raise Damaged(f"{where}: tables nested or repeated beyond any model's")
        t = _Table(self, pos, where, name)
        for field, fname, kind in SCHEMA.get(name, ()):
            if kind in SIZES:
                t.at(field, SIZES[kind])
                continue
            target = t.ref(field)
            if target is None:
                continue
            what = f"{where}.{fname}"
            if kind == "str":
                n = self.vector(target, 1, what)
                if self.data[target + 4 + n : target + 5 + n] != b"\0":
                    raise Damaged(f"{what}: the string at byte {target} has no end")
            elif kind[0] == "v" and kind[1:].isdigit():
                self.vector(target, int(kind[1:]), what)
            elif kind.startswith("vt:"):
                for i in range(self.vector(target, 4, what)):
                    p = target + 4 + 4 * i
                    sub = p + self.u32(p, what)
                    self.table(sub, kind[3:], f"{what}[{i}]", depth + 1)
            else:  # "t:Name" or "any"
                self.table(target, kind[2:] if kind != "any" else "", what, depth + 1)
        return t

    def elements(self, t: _Table, field: int, name: str, where: str) -> list[_Table]:
        """The tables of a vector-of-tables field (already checked by ``table``)."""
        pos = t.ref(field)
        if pos is None:
            return []
        n = self.u32(pos, where)
        return [
            _Table(self, pos + 4 + 4 * i + self.u32(pos + 4 + 4 * i, where), f"{where}[{i}]", name)
            for i in range(n)
        ]


def problem(data: bytes) -> str | None:
    """None for a flatbuffer the interpreter can read within bounds, else what is wrong."""
    try:
        _check(data)
    except Damaged as exc:
        return str(exc)
    return None


def _check(data: bytes) -> None:
    c = _Check(data)
    root = c.u32(0, "the root offset")
    model = c.table(root, "Model", "model", 0)
    codes = c.elements(model, 1, "OperatorCode", "model.operator_codes")
    buffers = c.elements(model, 4, "Buffer", "model.buffers")
    subgraphs = c.elements(model, 2, "SubGraph", "model.subgraphs")
    if not subgraphs:
        raise Damaged("the model holds no subgraph")
    for b, buf in enumerate(buffers):
        offset, size = buf.scalar(1, "Q"), buf.scalar(2, "Q")
        if offset > 1 and offset + size > len(data):  # data kept after the flatbuffer
            raise Damaged(
                f"model.buffers[{b}] holds bytes {offset} to {offset + size}, past the end of the "
                f"{len(data)}-byte file"
            )
    counts = []
    for s, sg in enumerate(subgraphs):
        where = f"model.subgraphs[{s}]"
        tensors = c.elements(sg, 0, "Tensor", f"{where}.tensors")
        n = len(tensors)
        counts.append(n)
        for t, tensor in enumerate(tensors):
            if tensor.scalar(2, "I") >= max(len(buffers), 1):
                raise Damaged(
                    f"{where}.tensors[{t}] names buffer {tensor.scalar(2, 'I')} of {len(buffers)}"
                )
        for side, field in (("inputs", 1), ("outputs", 2)):
            for i in c.ints(sg.ref(field), f"{where}.{side}"):
                if not 0 <= i < n:
                    raise Damaged(f"{where}.{side} names tensor {i} of {n}")
        for o, op in enumerate(c.elements(sg, 3, "Operator", f"{where}.operators")):
            w = f"{where}.operators[{o}]"
            if op.scalar(0, "I") >= len(codes):
                raise Damaged(f"{w} names operator code {op.scalar(0, 'I')} of {len(codes)}")
            for side, field in (("inputs", 1), ("outputs", 2), ("intermediates", 8)):
                for i in c.ints(op.ref(field), f"{w}.{side}"):
                    if not -1 <= i < n:  # -1: an optional input left out
                        raise Damaged(f"{w}.{side} names tensor {i} of {n}")
    for k, sig in enumerate(c.elements(model, 7, "SignatureDef", "model.signature_defs")):
        g = sig.scalar(4, "I")
        if g >= len(subgraphs):
            raise Damaged(f"model.signature_defs[{k}] names subgraph {g} of {len(subgraphs)}")
        for side, field in (("inputs", 0), ("outputs", 1)):
            for m, tm in enumerate(
                c.elements(sig, field, "TensorMap", f"model.signature_defs[{k}]")
            ):
                i = tm.scalar(1, "I")
                if i >= counts[g]:
                    raise Damaged(
                        f"model.signature_defs[{k}].{side}[{m}] names tensor {i} of {counts[g]}"
                    )
    for m, meta in enumerate(c.elements(model, 6, "Metadata", "model.metadata")):
        if meta.scalar(1, "I") >= len(buffers):
            raise Damaged(
                f"model.metadata[{m}] names buffer {meta.scalar(1, 'I')} of {len(buffers)}"
            )
