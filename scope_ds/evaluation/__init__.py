"""Evaluation: Avg@k and Pass@k of models on benchmarks, through the rollout servers.

- estimators: Avg@k, unbiased pass@k (Chen et al. 2021), the authors' bootstrap best-of-k (pure)
- sampling: tokenise, sample n per prompt, verify; ``evaluate_records`` for the training loop
- report: results.json, the Table-1 Markdown, Pass@k-vs-k plots

The command line is ``python -m scope_ds.evaluate``; benchmarks load from scope_ds.data.benchmarks.
See docs/evaluation.md.
"""

from scope_ds.evaluation.sampling import evaluate_records

__all__ = ["evaluate_records"]
