"""Reading a safetensors adapter for its description only, without torch (``loradex inspect``).

Within :func:`described`, ``pickle_io.load_tensors`` hands the readers a
:class:`~loradex.core.tensorspec.TensorSpec` per tensor of a safetensors file instead of the
tensor: shape and dtype from the validated header, the value of each one-element tensor (alphas,
``on_input``) read with ``struct``, and whether the values are finite answered from the tensor's
bytes when ``Adapter.nonfinite`` asks. The readers, the patch kinds and architecture detection run
unchanged on these descriptions (as they run on meta tensors), so the adapter they build describes
the file exactly as a full read does -- kinds, ranks, alphas, modules, embeddings, dtype, notes,
unexplained keys, NaN/Inf -- without a copy of any format, kind or arch rule. Whatever needs more
(math on a fused FLUX projection, the values of a larger tensor, a pickle) raises
``tensorspec.NeedsTorch`` or another error, and the caller reads the file again the full way
(``api.inspect`` does).
"""

from __future__ import annotations

import contextvars
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from loradex.converters.safetensors_io import SAFETENSORS_DTYPES, Header, tensor_bytes
from loradex.core.tensorspec import NeedsTorch, TensorSpec

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("loradex_described", default=False)

#: safetensors dtype -> struct format of one element (the 8-bit floats are left unread)
_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
           "U8": "<B", "BOOL": "<?", "U16": "<H", "U32": "<I", "U64": "<Q"}


@contextmanager
def described() -> Iterator[None]:
    """Within this block the adapter readers get tensor descriptions from safetensors files (see
    the module docstring); pickles are read as ever."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether the readers should describe rather than load (inside :func:`described`)."""
    return _ACTIVE.get()


def _number(raw: bytes, dtype: str):
    if dtype == "BF16":  # the upper half of a float32
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    fmt = _STRUCT.get(dtype)
    return None if fmt is None else struct.unpack(fmt, raw)[0]


#: per dtype: (byte width, index of the byte holding the exponent's top bits, its mask, index of the
#: byte holding the rest of the exponent or None, that byte's mask): a value is NaN/Inf exactly when
#: every exponent bit is set (IEEE 754, little-endian).
_EXPONENT = {
    "F16": (2, 1, 0x7C, None, 0),
    "BF16": (2, 1, 0x7F, 0, 0x80),
    "F32": (4, 3, 0x7F, 2, 0x80),
    "F64": (8, 7, 0x7F, 6, 0xF0),
}
_MARKS: dict[int, bytes] = {}


def _marks(mask: int) -> bytes:
    """``bytes.translate`` table: 1 for a byte with every bit of ``mask`` set, else 0."""
    if mask not in _MARKS:
        _MARKS[mask] = bytes(int(b & mask == mask) for b in range(256))
    return _MARKS[mask]


def finite_bytes(data: bytes, dtype: str) -> bool:
    """Whether no element of the little-endian ``dtype`` array ``data`` is NaN or Inf (F16, BF16,
    F32, F64; KeyError for another dtype). Exponent bytes are picked with strided slices and tested
    with ``bytes.translate``: C speed without numpy or torch."""
    width, hi, hi_mask, lo, lo_mask = _EXPONENT[dtype]
    top = data[hi::width].translate(_marks(hi_mask))
    if b"\x01" not in top:
        return True
    if lo is None:
        return False
    rest = data[lo::width].translate(_marks(lo_mask))
    return not (int.from_bytes(top, "little") & int.from_bytes(rest, "little"))


def _finite_check(header: Header, key: str):
    def finite() -> bool:
        dtype = header.tensors[key].dtype
        if dtype not in _EXPONENT:
            raise NeedsTorch(f"no NaN/Inf check without torch for {dtype} tensors")
        return finite_bytes(tensor_bytes(header, [key])[key], dtype)

    return finite


def load_specs(header: Header) -> dict[str, TensorSpec]:
    """Every tensor of a validated safetensors header as a :class:`TensorSpec` (see the module
    docstring): one-element tensors carry their value, the others check their bytes for NaN/Inf
    when asked."""
    small = [k for k, i in header.tensors.items() if i.nbytes and i.nbytes == SAFETENSORS_DTYPES[i.dtype][1]]
    values = {k: _number(raw, header.tensors[k].dtype) for k, raw in tensor_bytes(header, small).items()}
    return {k: TensorSpec(i.shape, SAFETENSORS_DTYPES[i.dtype][0], value=values.get(k),
                          finite=_finite_check(header, k))
            for k, i in header.tensors.items()}
