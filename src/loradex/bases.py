"""The base model a user names, resolved once for every command (``--base BASE``).

``BASE`` may be:

* a diffusers pipeline folder (its ``model_index.json`` and component ``config.json`` files give
  the arch: no weights are read) or a single-file checkpoint (the shapes in its header);
* an embedded tiny model (``tiny``, ``tiny-sdxl``, ...) or a built-in size (``sd1``, ``sdxl``...):
  an arch without weights (enough for convert/inspect/merge, not for bake/extract/train);
* a registry REF of a stored checkpoint or pipeline folder (the arch the registry recorded for it,
  else derived from its files, checked out for the command's duration);
* a Hub repo id (``org/name``) already in the local Hugging Face cache (offline: nothing is
  downloaded; ``HF_HUB_CACHE``/``HF_HOME`` say where the cache is).

The arch comes from the base's own configs and sizes (``converters.checkpoint.model_arch``), so
custom widths and depths work; derived archs are cached on disk by ``core.archs``, so later calls
need neither the base nor a rebuild. ``identity`` is what the registry records as the base of
what is stored, trained, extracted or baked against it: the REF, the Hub id, or the absolute path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loradex.errors import ArchError, FormatError, LoradexError, RegistryError
from loradex.hubcache import REPO_ID as _REPO_ID
from loradex.hubcache import hub_snapshot


@dataclass
class Base:
    """A resolved base: ``path`` (a folder or file on disk) unless it is a name without weights;
    ``version`` when it is a registry REF; ``arch`` derived on first use (an explicit ``--arch``
    never pays for it, and errors about the model surface where it is read)."""

    spec: str
    _arch: object  # an Arch, or a callable returning one
    identity: str
    path: Path | None = None
    version: object = None
    source: str = "path"  # path | name | ref | hub

    @property
    def arch(self):
        """The base's Arch (loradex.core.archs.Arch)."""
        if callable(self._arch):
            self._arch = self._arch()
        return self._arch

    def require_path(self, what: str = "this command") -> Path:
        """``path``, or FormatError naming ``what`` when the base is only an arch name (``tiny``,
        ``sdxl``...): bake, extract, train and generate need weights."""
        if self.path is None:
            raise FormatError(f"--base {self.spec} names an architecture, not a model with weights: "
                              f"{what} needs a diffusers folder, a checkpoint file, a registry REF or a cached Hub id")
        return self.path


def _registry_if_any():
    """The registry when one exists (never creates a home as a side effect of naming a base)."""
    from loradex.registry.registry import Registry, default_home

    home = os.environ.get("LORADEX_HOME") or str(default_home())
    if not Path(home).expanduser().is_dir():
        return None
    try:
        return Registry(readonly=None)
    except RegistryError:
        return None


@contextlib.contextmanager
def resolve_base(spec: str | os.PathLike, registry=None) -> Iterator[Base]:
    """Resolve ``spec`` (see the module docstring); a REF stays checked out inside the ``with``.
    LoradexError (one line) when it is none of the accepted forms."""
    from loradex.converters.checkpoint import model_arch
    from loradex.core.archs import get_arch

    text = str(spec)
    p = Path(text).expanduser()
    if p.exists():
        yield Base(text, lambda: model_arch(p), str(p.resolve()), path=p)
        return
    named = None
    with contextlib.suppress(ArchError):
        named = get_arch(text)
    if named is not None:
        yield Base(text, named, named.name, source="name")
        return
    reg = registry if registry is not None else (None if "/" in text else _registry_if_any())
    if reg is not None and "/" not in text:
        try:
            v = reg.get(text)
        except RegistryError:
            v = None
        if v is not None:
            if v.artifact != "checkpoint":
                raise FormatError(f"--base {text}: {v.ref} is a stored {v.artifact}, not a base model (a checkpoint "
                                  "or pipeline folder)")
            with reg.checkout(v) as path:
                arch = (lambda: reg.arch(v.arch)) if v.arch else (lambda: model_arch(path))
                yield Base(text, arch, v.ref, path=path, version=v, source="ref")
            return
    snap = hub_snapshot(text)
    if snap is not None:
        def arch():
            try:
                return model_arch(snap)
            except LoradexError as e:
                raise FormatError(f"--base {text}: the cached Hub snapshot {snap} is not a usable base ({e})") from None

        yield Base(text, arch, text, path=snap, source="hub")
        return
    hint = (" (a Hub id: not in the local Hugging Face cache; download it first, e.g. "
            f"`huggingface-cli download {text}`)" if _REPO_ID.match(text) else "")
    raise FormatError(f"--base {text}: not a diffusers folder or checkpoint file, an architecture name, "
                      f"a registry REF of a stored base, or a Hub id in the local cache{hint}")
