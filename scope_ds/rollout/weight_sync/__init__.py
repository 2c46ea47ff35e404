"""Trainer-side weight sync to rollout servers; one module per method (disk, distributed).

Both take an iterator of (Hugging Face name, full tensor) pairs: the trainer gathers its ZeRO-3
parameters and feeds them, so nothing here knows DeepSpeed. ``update(named_tensors, version)``
pauses generation, pushes the weights labelled ``version``, checks every server now reports exactly
that version, and resumes. The caller names the version (the trainer owns the policy version);
the method checks the servers report it, and raises WeightSyncError (servers left paused) if not.
The Hugging Face folder writer is :mod:`scope_ds.hf_folder`.
"""

from scope_ds.rollout.weight_sync.common import WeightSync, WeightSyncError
from scope_ds.rollout.weight_sync.disk import DiskWeightSync
from scope_ds.rollout.weight_sync.distributed import DistributedWeightSync, plan_buckets

__all__ = ["DiskWeightSync", "DistributedWeightSync", "WeightSync", "WeightSyncError", "plan_buckets"]
