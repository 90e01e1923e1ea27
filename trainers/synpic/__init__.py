"""Syn-Pic ranked preference data (rankdpo.txt sec. 3.2): ``refinery-synpic``.

``config`` (generator specs, the frozen config and ``parse_args``), ``generators`` (pipelines and deterministic
drawing), ``run`` (generation, scoring, win rates, ``index.jsonl``; the command). Win rates come from
``core/reward_aggregation.py``.
"""
