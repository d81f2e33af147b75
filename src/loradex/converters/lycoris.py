"""LyCORIS' standalone wrapper format: ``lycoris_<module path with '.' -> '_'>.<suffix>``.

``lycoris.create_lycoris(module)`` wraps ONE model (a UNet, a transformer or a text encoder) and
names keys relative to it, so a file holds one component. Reading finds the component whose
flattened module names match; writing needs a single-component adapter (or ``component=``).
Under transformers 5 a wrapped CLIPTextModel has no ``text_model`` level: both spellings are read;
the writer spells text encoders the way the live model names its modules (``text_model_`` dropped
for CLIPTextModel, kept for CLIPTextModelWithProjection), which is what
``create_lycoris_from_weights`` needs to find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.converters.common import (
    ConversionReport,
    Converter,
    cast,
    fit_kinds,
    live_path,
    register_format,
    resolve_arch,
)
from loradex.converters.kohya import nothing_read, read_patches
from loradex.converters.metadata import modelspec
from loradex.core.adapter import Adapter, component_of
from loradex.errors import ArchError, ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

PREFIX = "lycoris_"


def _flat_map(arch, component: str | None = None) -> dict[str, str]:
    """flattened module path (no component) -> canonical name, both CLIP spellings."""
    m: dict[str, str] = {}
    for name in arch.modules:
        comp, _, path = name.partition(".")
        if component is not None and comp != component:
            continue
        m.setdefault(comp, {})  # type: ignore[arg-type]
        flat = path.replace(".", "_")
        m[comp][flat] = name  # type: ignore[index]
        if path.startswith("text_model."):
            m[comp][path[len("text_model.") :].replace(".", "_")] = name  # type: ignore[index]
    return m


@register_format
class Lycoris(Converter):
    """LyCORIS' standalone wrapper keys (``lycoris_<flattened module path>.<suffix>``), one model
    component per file, every kind (see the module docstring)."""

    name = "lycoris"
    priority = 30
    options = frozenset({"component"})
    description = "LyCORIS standalone wrapper keys (lycoris_*), one model component, every kind"

    def detect(self, path: Path) -> bool:
        """True for a file (safetensors or ``weights_only`` pickle) with any key starting with
        ``lycoris_``."""
        if not path.is_file():
            return False
        return any(k.startswith(PREFIX) for k in pickle_io.read_tensor_header(path).tensors)

    def read(self, path: Path, arch=None) -> Adapter:
        """Every key is read or named in ``Adapter.unexplained``: keys without the ``lycoris_``
        prefix, modules of no component of the arch, and tensors no kind owns (see
        ``kohya.read_patches``)."""
        h = pickle_io.read_tensor_header(path)
        unexplained: dict[str, str] = pickle_io.pickled_extras(path)  # a pickle's non-tensor entries
        groups: dict[str, dict[str, str]] = {}
        for k in h.tensors:
            flat, dot, suffix = k.partition(".")
            if not k.startswith(PREFIX) or not dot or not suffix:
                unexplained[k] = "not a lycoris_ key (lycoris_<module>.<tensor>)"
                continue
            groups.setdefault(flat[len(PREFIX) :], {})[suffix] = k
        if not groups:
            raise FormatError(f"{path}: no lycoris_ keys found")
        a = resolve_arch(arch, h.shapes(), required=True, path=path, metadata=dict(h.metadata))
        maps = _flat_map(a)
        # the component whose module names cover the most keys
        comp = max(maps, key=lambda c: sum(f in maps[c] for f in groups))
        table = maps[comp]
        if not any(f in table for f in groups):
            raise ArchError(f"{path}: lycoris_ keys match no module of {a.name}")

        def unflatten(flat: str):
            if flat not in table:
                raise ArchError(flat)
            return [(table[flat], None)]

        tensors = pickle_io.load_tensors(path, header=h)
        patches, notes, more = read_patches(
            groups, tensors, a, unflatten, path, missing=f" {comp} (a lycoris_ file holds one component, here {comp})")
        unexplained.update(more)
        if not patches:
            raise nothing_read(path, unexplained)
        return Adapter(patches, {}, dict(h.metadata), a.name, self.name, notes, unexplained)

    def write(
        self, adapter: Adapter, path: Path, report: ConversionReport, dtype=None, rank=None, component=None, arch=None, title=None
    ):
        """Write the patches of one component as ``lycoris_<live module path, '.' -> '_'>.<suffix>``
        (every kind as is; the path spelled as :func:`live_path` says, which
        ``create_lycoris_from_weights`` matches) with ModelSpec metadata. ``component`` picks the
        component (required when the adapter spans several; the others are reported as dropped);
        embeddings are left out with a note."""
        comps = sorted({component_of(n) for n in adapter.patches})
        if component is None:
            if len(comps) != 1:
                raise ConversionError(
                    f"the lycoris_ format holds one model component and this adapter has {', '.join(comps)}; "
                    "use --to kohya (which holds them all) or pick one component"
                )
            component = comps[0]
        adapter = fit_kinds(adapter, self.kinds, rank, report)
        a = resolve_arch(arch or adapter.arch, {}, required=False, path=path)
        out: dict[str, torch.Tensor] = {}
        for name, p in adapter.patches.items():
            if component_of(name) != component:
                report.dropped[name] = f"not in component {component}"
                continue
            for suffix, t in p.tensors().items():
                out[f"{PREFIX}{live_path(name, a).replace('.', '_')}.{suffix}"] = cast(t, dtype)
        if adapter.embeddings:
            report.notes.append("embeddings are not part of the lycoris_ format; write them with --to a1111-ti")
        sio.save(out, path, modelspec(adapter, title or Path(path).stem))
