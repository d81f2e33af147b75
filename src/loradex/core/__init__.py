"""Format-neutral model of adapters: pure math, no file I/O."""
