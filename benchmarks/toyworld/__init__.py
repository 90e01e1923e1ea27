"""Synthetic toy world: scenes with captions, defect injectors with exact ground-truth masks (benchmarks and demo only, never imported by the nodes)."""
