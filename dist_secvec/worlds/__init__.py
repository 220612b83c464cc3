"""Worlds the experiment runner builds for itself: embedded (the demo's tiny synthetic worlds and a
tiny Llama; embedded_stages: their stage settings and cached aligned base) and smollm2 (a real
pretrained model and real harmful prompts, offline from two PyPI packages)."""
