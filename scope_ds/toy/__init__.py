"""The toy: multi-step arithmetic small enough to train on a laptop CPU, in one package.

- ``task``: the problems, prompts and solution texts of each variant (``data.toy_variant``);
- ``verify``: the exact verifier of its answers (the ``toy`` verifier);
- ``models``: the toy teacher and student, pre-trained on first use and cached;
- ``properties``: what a run's rollouts say about SCOPE's weights on it
  (``python -m scope_ds.toy.properties RUN ...``).

It imports nothing of the package but the records, so the data sources and the verifiers use it.
"""
