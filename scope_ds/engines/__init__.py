"""Every call into DeepSpeed: the student (ZeRO-3, trains), the teacher and reference (inference
only), their configs, the process group, checkpoints of the student's partitions."""
