"""The registry: content-addressed store, SQLite catalogue, hashes, Hub publishing.

    from loradex import Registry
    reg = Registry()                               # $LORADEX_HOME, else ~/.local/share/loradex
    reg.add("face.safetensors", name="face", tags=["prod"])
    reg.load("face:prod")

``store.py`` keeps the bytes (never parses them), ``db.py`` the catalogue (sqlite-utils, WAL),
``hashes.py`` the identities (sha256, Civitai AutoV1/V2/V3, CRC32, kohya sshs), ``hub.py`` the
Hugging Face Hub (push with a model card, pull into the registry).
"""

from loradex.registry.db import Version
from loradex.registry.registry import ImportReport, Registry, validate_name

__all__ = ["ImportReport", "Registry", "Version", "validate_name"]
