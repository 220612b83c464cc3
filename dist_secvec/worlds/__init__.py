"""Worlds the experiment runner builds for itself beyond the demo's embedded one: smollm2 (a real
pretrained model and real harmful prompts, offline from two PyPI packages)."""
