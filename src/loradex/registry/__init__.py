"""The registry: content-addressed store, SQLite catalogue, hashes, Hub publishing.

    from loradex import Registry
    reg = Registry()                               # $LORADEX_HOME, else ~/.local/share/loradex
    reg.add("face.safetensors", name="face", tags=["prod"])
    reg.load("face:prod")

``registry.py`` is the facade (``Registry``) over the rooms: ``refs.py`` (REF grammar and
resolution, ``REF[:W]`` weights), ``ingest.py`` (staging, describing and recording imports),
``scan.py`` (what a path offers: regular files only, symlink rules), ``store.py`` (the bytes, never
parsed; checked against their names on the way out), ``linking.py`` (where a file being ingested
lies under its own name; ``add --link``'s reflinks and hard links), ``finite.py`` (NaN/Inf found
from the bytes), ``db.py`` (the catalogue: every SQL query, sqlite-utils, WAL), ``version.py``
(the ``Version`` record), ``maintenance.py`` (verify, gc), ``faults.py`` (disk-full and other OS
faults as one-line errors), ``hashes.py`` (sha256, Civitai AutoV1/V2/V3, CRC32, kohya sshs),
``sketches.py`` / ``sketch_plans.py`` / ``sketch_import.py`` (similarity sketches, at import too)
and ``hub.py`` (the Hugging Face Hub: push with a model card, pull into the registry; it depends
on the Registry, not the reverse).
"""

from loradex.registry.ingest import ImportReport
from loradex.registry.refs import split_weight, validate_name
from loradex.registry.registry import Registry
from loradex.registry.version import Version

__all__ = ["ImportReport", "Registry", "Version", "split_weight", "validate_name"]
