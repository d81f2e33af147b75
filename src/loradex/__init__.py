"""loradex: personalization adapters for diffusion models — store, convert, merge, serve, train."""

__version__ = "0.1.0"
