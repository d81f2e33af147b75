"""``TensorSpec``: a tensor described without torch -- its shape and dtype, the value of a
one-element tensor, and (given by whoever read it) whether its values are finite.

Describing an adapter file needs no tensor math: kinds, ranks and the arch come from shapes, alphas
from 0-dim tensors. The readers and the patch kinds run unchanged on these descriptions (the
converters hand them out instead of tensors when asked to describe a file, see
``converters.described``), as they run on torch's meta tensors, so a description never has its
own copy of any format, kind or arch rule. A spec supports what building a patch does with a
tensor -- ``shape``, ``ndim``/``dim()``, ``dtype``, ``numel()``, ``is_floating_point()``,
``element_size()``, ``device``, ``is_meta``, ``reshape``/``flatten``/``unsqueeze``, indexing with
``:`` and ``None``, ``detach`` -- and raises :class:`NeedsTorch` for anything else (math, values of a
larger tensor): the describing code then reads the file again with torch.

Two flavours: ``meta=True`` behaves like a meta tensor (no values at all; reading one raises
RuntimeError as torch does), used by architecture detection; file-backed specs (``meta=False``)
hold the value of a one-element tensor and answer :meth:`TensorSpec.all_finite` through the
``finite`` callable their reader gave them (core reads no files).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable

#: torch dtype name -> bytes per element (what the specs need to know of a dtype)
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}
_FLOATS = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


class NeedsTorch(Exception):
    """A :class:`TensorSpec` was asked for something only a real tensor has (math, the values of a
    tensor of more than one element). Deliberately not a LoradexError, ValueError or RuntimeError:
    nothing on the way swallows it, and whoever described the file reads it with torch instead."""


class DType:
    """A torch dtype known by name only: ``str()`` is ``torch.<name>`` as torch prints it, and it
    compares equal to the torch dtype of that name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if name not in ITEMSIZE:
            raise ValueError(f"unknown dtype {name!r}")
        self.name = name

    @property
    def is_floating_point(self) -> bool:
        """True for the floating-point dtypes (as ``torch.dtype.is_floating_point``)."""
        return self.name in _FLOATS

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return ITEMSIZE[self.name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return other.name == self.name
        return str(other) == str(self)  # a torch.dtype (only present when torch already is)

    def __hash__(self) -> int:
        return hash(str(self))


class _Device:
    __slots__ = ("type",)

    def __init__(self, kind: str) -> None:
        self.type = kind

    def __repr__(self) -> str:
        return f"device(type={self.type!r})"


_META, _CPU = _Device("meta"), _Device("cpu")


class TensorSpec:
    """A tensor's shape and dtype, the value of a one-element tensor, and whether its values are
    finite (see the module docstring). ``value``: the number a file stores for a one-element tensor
    (None when not read); ``finite``: a callable answering for the whole tensor (file-backed specs);
    ``meta``: behave like a meta tensor (no values whatsoever)."""

    __slots__ = ("shape", "dtype", "value", "is_meta", "_finite")

    def __init__(self, shape, dtype: str | DType, value: float | int | bool | None = None,
                 finite: Callable[[], bool] | None = None, meta: bool = False) -> None:
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = dtype if isinstance(dtype, DType) else DType(dtype)
        self.value = value
        self.is_meta = meta
        self._finite = finite

    def __repr__(self) -> str:
        v = "" if self.value is None else f", value={self.value!r}"
        return f"TensorSpec({self.shape}, {self.dtype.name}{v}{', meta' if self.is_meta else ''})"

    def __getattr__(self, name: str):
        raise NeedsTorch(f"a tensor description has no {name!r} (it needs the tensor itself)")

    # ---- what a tensor tells without its values ------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    def dim(self) -> int:
        """Number of axes (``Tensor.dim()``)."""
        return len(self.shape)

    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def size(self, dim: int | None = None):
        """The shape, or its length along ``dim``."""
        return self.shape if dim is None else self.shape[dim]

    def is_floating_point(self) -> bool:
        """True for a floating-point dtype."""
        return self.dtype.is_floating_point

    def element_size(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    @property
    def device(self) -> _Device:
        """``meta`` for a meta-like spec, else ``cpu`` (where a file's tensors load)."""
        return _META if self.is_meta else _CPU

    def detach(self) -> TensorSpec:
        """Itself (a description has no autograd history)."""
        return self

    # ---- views: the same elements, another shape ---------------------------------------------
    def _view(self, shape) -> TensorSpec:
        return TensorSpec(shape, self.dtype, self.value, self._finite, self.is_meta)

    def reshape(self, *shape) -> TensorSpec:
        """The same elements in ``shape`` (one axis may be -1)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        n = self.numel()
        if shape.count(-1) > 1 or any(s < -1 for s in shape):
            raise RuntimeError(f"invalid shape {shape}")
        known = math.prod(s for s in shape if s != -1)
        if -1 in shape:
            if known == 0 or n % known:
                raise RuntimeError(f"shape {shape} is invalid for input of size {n}")
            shape = tuple(n // known if s == -1 else s for s in shape)
        if math.prod(shape) != n:
            raise RuntimeError(f"shape {list(shape)} is invalid for input of size {n}")
        return self._view(shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> TensorSpec:
        """Axes ``start_dim..end_dim`` merged into one."""
        if not self.shape:
            return self._view((1,))
        nd = len(self.shape)
        s, e = start_dim % nd, end_dim % nd
        if s > e:
            raise RuntimeError("flatten() has invalid args: start_dim cannot come after end_dim")
        return self._view((*self.shape[:s], math.prod(self.shape[s : e + 1]), *self.shape[e + 1 :]))

    def unsqueeze(self, dim: int) -> TensorSpec:
        """A new axis of length 1 at ``dim``."""
        nd = len(self.shape) + 1
        if not -nd <= dim < nd:
            raise IndexError(f"dimension {dim} out of range")
        d = dim % nd
        return self._view((*self.shape[:d], 1, *self.shape[d:]))

    def __getitem__(self, index) -> TensorSpec:
        """Only ``:`` (whole axes), ``...`` and ``None`` (new axes): what re-shaping code indexes with."""
        items = index if isinstance(index, tuple) else (index,)
        if any(not (i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None))) for i in items):
            raise NeedsTorch("a tensor description can only be indexed with ':', '...' and None")
        if items.count(Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        if used > len(self.shape):
            raise IndexError(f"too many indices for tensor of dimension {len(self.shape)}")
        if Ellipsis not in items:
            items = (*items, Ellipsis)
        out: list[int] = []
        axis = 0
        for i in items:
            if i is None:
                out.append(1)
            elif i is Ellipsis:
                rest = len(self.shape) - used
                out.extend(self.shape[axis : axis + rest])
                axis += rest
            else:
                out.append(self.shape[axis])
                axis += 1
        return self._view(tuple(out))

    # ---- values: one-element tensors and finiteness --------------------------------------------
    def _number(self):
        if self.is_meta:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        if self.numel() != 1:
            raise NeedsTorch("the values of a tensor of more than one element are not read")
        if self.value is None:
            raise NeedsTorch("this tensor's value was not read")
        return self.value

    def item(self):
        """The value of a one-element tensor (a Python number)."""
        return self._number()

    def __float__(self) -> float:
        return float(self._number())

    def __int__(self) -> int:
        return int(self._number())

    def __bool__(self) -> bool:
        return bool(self._number())

    def __index__(self) -> int:
        if self.is_floating_point():
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return int(self._number())

    def float32_value(self) -> float:
        """The value as ``float(t.float())`` gives it: the stored number rounded to float32."""
        return to_float32(float(self._number()))

    def all_finite(self) -> bool:
        """Whether every value is finite (no NaN, no Inf). Integer tensors and empty ones are; a
        meta-like spec has no values (True, as ``Adapter.nonfinite`` skips meta tensors); others ask
        the ``finite`` callable their reader gave them (NeedsTorch without one)."""
        if not self.is_floating_point() or self.is_meta or self.numel() == 0:
            return True
        if self.value is not None and self.numel() == 1:
            return math.isfinite(float(self.value))
        if self._finite is None:
            raise NeedsTorch("this tensor's values were not read")
        return bool(self._finite())


def _math(self, *args, **kwargs):
    raise NeedsTorch("a tensor description holds no values to compute with")


# arithmetic, comparisons, iteration: a description has no values (a meta tensor would compute a
# meta result; code that needs one reads the tensor itself)
for _op in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "floordiv", "rfloordiv", "mod",
            "rmod", "pow", "rpow", "matmul", "rmatmul", "neg", "pos", "abs", "invert", "and", "rand", "or", "ror",
            "xor", "rxor", "lt", "le", "gt", "ge", "eq", "ne", "iter", "contains", "round"):
    setattr(TensorSpec, f"__{_op}__", _math)
TensorSpec.__hash__ = object.__hash__  # (defining __eq__ would drop it)


def to_float32(v: float) -> float:
    """``v`` rounded to the nearest float32, as torch stores it (beyond float32's range: +-inf)."""
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def scalar_tensor(value: float, like: object = None):
    """``torch.tensor(float(value))`` (0-dim float32) -- or its description when ``like``, a tensor
    of the same file, is a :class:`TensorSpec` (a reader building an alpha for a file it describes)."""
    if isinstance(like, TensorSpec):
        return TensorSpec((), "float32", value=to_float32(float(value)))
    from loradex.core.lazy import torch

    return torch.tensor(float(value))


def is_tensor(x: object) -> bool:
    """True for a torch tensor or a :class:`TensorSpec`, without importing torch (when torch is not
    imported yet no object can be a torch tensor)."""
    if isinstance(x, TensorSpec):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, getattr(torch, "Tensor", ()))


def all_finite(t) -> bool:
    """Whether a tensor (or spec) holds no NaN/Inf: always True for meta tensors and meta-like specs,
    which hold no values."""
    if isinstance(t, TensorSpec):
        return t.all_finite()
    return t.device.type == "meta" or bool(sys.modules["torch"].isfinite(t).all())
