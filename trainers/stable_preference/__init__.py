"""Stable Preference reward trainer (stable-preference.txt): ``refinery-train-preference``.

``config`` (the frozen config and ``parse_args``), ``data`` (pairs.jsonl reading with line-numbered errors, image
loading, step-indexed batches), ``train`` (the command). The losses are in ``core/stable_preference.py``.
"""
