"""Inference: one base pipeline, adapters hot-swapped into fixed LoRA slots (engine.py), a tiered
cache (cache.py), and the HTTP / Ray front ends (server.py, ray_serve.py). types.py is their contract."""
