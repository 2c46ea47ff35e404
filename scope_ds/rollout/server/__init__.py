"""The embedded rollout server: SGLang's native HTTP API over a Hugging Face model, for CPU runs and tests.

It does not replace SGLang: no paged attention, no CUDA graphs, no tensor parallelism. Run it with
``python -m scope_ds.rollout.server --model-path DIR --port P``.
"""
