"""The Megatron-core pretraining step: config, schedules, data, the per-rank trainer and the Ray Train launch."""
