"""RankDPO / pairwise Diffusion-DPO LoRA trainer (rankdpo.txt): ``refinery-train-rankdpo``.

``config`` (the frozen config and ``parse_args``), ``data`` (Syn-Pic ``index.jsonl`` reading with line-numbered
errors, image loading), ``train`` (the command). The losses are in ``core/rankdpo.py``; the LoRA is written by
``core/lora_export.py``.
"""
