"""Synthetic toy world: scenes with captions, and defect injectors with exact ground-truth masks.

Imported by the benchmarks and the demo, never by the nodes."""
