"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment."""

from __future__ import annotations

import os

import jax


def maybe_initialize(dist_cfg: dict | None) -> bool:
    """Join the multi-process runtime when the config or environment asks for it.

    Keys (all optional): coordinator_address, num_processes, process_id, local_device_ids.
    Without keys, JAX's own auto-detection (SLURM, ...) runs when JAX_COORDINATOR_ADDRESS or
    SLURM_JOB_ID with more than one task is set. Returns True when initialized.
    """
    dist_cfg = dict(dist_cfg or {})
    if not dist_cfg and not (os.environ.get("JAX_COORDINATOR_ADDRESS")
                             or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        return False
    jax.distributed.initialize(**dist_cfg)
    return True
