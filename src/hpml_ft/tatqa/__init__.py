"""The TAT-QA task in one place: rendering tables and answers for training (render.py), derivation targets
(target.py), the derivation executor (executor.py) and the official scorer's semantics (metric.py,
normalize.py). Used by data loading, training's quick eval, eval and infer alike; imports no CLI, eval or
training code."""
