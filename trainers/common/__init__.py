"""Pieces every trainer shares (STYLE.md section 4): model loading, LoRA setup and export helpers, and (as they land)
config, accelerate setup, checkpointing."""
