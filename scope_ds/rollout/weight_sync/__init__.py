"""Trainer-side weight sync to rollout servers; one module per method (disk, distributed).

Both take an iterator of (Hugging Face name, full tensor) pairs: the trainer gathers its ZeRO-3
parameters and feeds them, so nothing here knows DeepSpeed. Each ``update`` pauses generation,
pushes the weights, checks every server reports the new policy version (+1), and resumes.
"""

from scope_ds.rollout.weight_sync.common import WeightSyncError
from scope_ds.rollout.weight_sync.disk import DiskWeightSync, write_hf_folder
from scope_ds.rollout.weight_sync.distributed import DistributedWeightSync, plan_buckets

__all__ = ["DiskWeightSync", "DistributedWeightSync", "WeightSyncError", "plan_buckets", "write_hf_folder"]
