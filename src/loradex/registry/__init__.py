"""The registry: content-addressed store, SQLite catalogue, hashes, Hub publishing."""
