"""Hub repos in the local Hugging Face cache, never downloaded: what ``--base REPO_ID`` and
``push --samples`` (a recorded base that is a Hub id) resolve through. Offline by design: a repo
that is not cached is None, and the caller says how to download it."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``owner/name`` as the Hub spells repo ids
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub repo in the Hugging Face cache, or None when it is not
    cached. Never downloads (``local_files_only``)."""
    if not REPO_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface-hub is a dependency
        return None
    # the cache as the environment names it now (huggingface_hub reads its variables at import)
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                                if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    except Exception:  # huggingface_hub raises its own types for malformed caches
        return None
