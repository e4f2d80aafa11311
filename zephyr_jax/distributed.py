"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

One process per host owns all of that host's accelerators (the Zephyr run: 4 processes x 8
H100). The settings come from, first to last:

1. the training config's `distributed:` mapping: `coordinator_address` ("host:port"),
   `num_processes`, `process_id`, and optionally `local_device_ids`, `coordinator_port`,
   `initialization_timeout` (seconds);
2. the environment: `JAX_COORDINATOR_ADDRESS` (JAX's own), `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS` (JAX's own);
3. SLURM: `SLURM_NTASKS` processes, this one `SLURM_PROCID`; the coordinator is the first host of
   `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`) on `coordinator_port`, else
   `JAX_COORDINATOR_PORT`, else JAX's own choice for SLURM (61440 + job id mod 4096).

A key the config leaves out is taken from the next source. One process in total means no
initialization. On CPU the processes exchange collectives over TCP with gloo.

`scripts/launch_slurm.sh` starts the 141B recipe this way; `tests/test_multihost.py` runs two
local processes over 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from zephyr_jax.config import ConfigError

CONFIG_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids",
               "coordinator_port", "initialization_timeout")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What `jax.distributed.initialize` is called with, and where each value came from."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every device this process sees
    initialization_timeout: int = 300
    source: str = "config"

    def initialize_kwargs(self) -> dict:
        return {"coordinator_address": self.coordinator_address,
                "num_processes": self.num_processes, "process_id": self.process_id,
                "local_device_ids": list(self.local_device_ids) if self.local_device_ids else None,
                "initialization_timeout": self.initialization_timeout,
                # everything is resolved here: JAX's SLURM detection would otherwise restrict
                # each process to the single GPU numbered SLURM_LOCALID
                "cluster_detection_method": "deactivate"}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-006,9],cpu1" -> "gpu003",
    "node[01-02]-ib" -> "node01-ib", "rack[1-2]-n[01-04]" -> "rack1-n01" (SLURM expands the
    bracket groups left to right, each from its first entry)."""
    text = nodelist.strip()
    item = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])*", text).group(0)  # up to a comma outside []
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], item)
    if not host or not (item == text or text[len(item)] == ","):
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot find its first host")
    return host


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def _device_ids(value, name: str) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, Sequence):
        return tuple(_int(v, name) for v in value)
    raise ConfigError(f"{name}: expected a list of device ids, got {value!r}")


def resolve(dist_cfg: Mapping | None, environ: Mapping[str, str] | None = None
            ) -> DistributedSettings | None:
    """The settings for this process, or None for a single-process run. Reads nothing but
    `dist_cfg` and `environ` (default `os.environ`); raises ConfigError naming the key."""
    env = os.environ if environ is None else environ
    cfg = dict(dist_cfg or {})
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"distributed: unknown key(s) {unknown}; have {list(CONFIG_KEYS)}")
    slurm = "SLURM_NTASKS" in env and "SLURM_PROCID" in env
    sources = []

    def pick(key: str, env_key: str, slurm_key: str | None):
        if cfg.get(key) is not None:
            sources.append("config")
            return cfg[key], f"distributed.{key}"
        if env.get(env_key):
            sources.append(env_key)
            return env[env_key], env_key
        if slurm and slurm_key:
            sources.append("SLURM")
            return env[slurm_key], slurm_key
        return None, key

    num, num_name = pick("num_processes", "JAX_NUM_PROCESSES", "SLURM_NTASKS")
    if num is None or _int(num, num_name) == 1:
        if cfg.get("coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS"):
            if num is None:
                raise ConfigError("distributed: a coordinator_address is set but not "
                                  "num_processes (config) / JAX_NUM_PROCESSES")
        return None
    num = _int(num, num_name)
    pid, pid_name = pick("process_id", "JAX_PROCESS_ID", "SLURM_PROCID")
    if pid is None:
        raise ConfigError(f"distributed: {num} processes but no process_id (config), "
                          "JAX_PROCESS_ID or SLURM_PROCID")
    pid = _int(pid, pid_name)
    if not 0 <= pid < num:
        raise ConfigError(f"distributed: process_id {pid} is not in [0, {num})")

    address = cfg.get("coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        sources.append("config" if cfg.get("coordinator_address") else "JAX_COORDINATOR_ADDRESS")
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ConfigError("distributed: no coordinator_address (config), "
                              "JAX_COORDINATOR_ADDRESS or SLURM node list")
        port = cfg.get("coordinator_port") or env.get("JAX_COORDINATOR_PORT")
        if port is None:
            port = 61440 + _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 4096
        address = f"{first_host(nodelist)}:{_int(port, 'distributed.coordinator_port')}"
        sources.append("SLURM")
    if ":" not in address:
        raise ConfigError(f"distributed.coordinator_address: {address!r} needs a port (host:port)")

    if cfg.get("local_device_ids") is not None:
        local = _device_ids(cfg["local_device_ids"], "distributed.local_device_ids")
    elif env.get("JAX_LOCAL_DEVICE_IDS"):
        local = _device_ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
    elif slurm and "SLURM_LOCALID" in env and _tasks_per_node(env) > 1:
        local = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)  # one process per GPU
    else:
        local = None  # one process per host: all of its devices
    timeout = _int(cfg.get("initialization_timeout", 300), "distributed.initialization_timeout")
    return DistributedSettings(address, num, pid, local, timeout,
                               source="+".join(dict.fromkeys(sources)))


def _tasks_per_node(env: Mapping[str, str]) -> int:
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if not nodes:
        return 1
    return max(1, _int(env["SLURM_NTASKS"], "SLURM_NTASKS") // _int(nodes, "SLURM_NNODES"))


def maybe_initialize(dist_cfg: Mapping | None = None) -> DistributedSettings | None:
    """Join the multi-process runtime when the config or environment asks for it (see the module
    docstring); call before anything asks JAX about devices. Returns the settings used, or None
    for a single process. A second call in the same process does nothing."""
    settings = resolve(dist_cfg)
    if settings is None:
        return None
    if jax.distributed.is_initialized():
        return settings
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: collectives over TCP
    jax.distributed.initialize(**settings.initialize_kwargs())
    return settings


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one: lets all hosts agree to stop
    (a SIGTERM seen by some hosts at step n, by others at n + 1, would otherwise leave them in
    different collectives). Every process must call it at the same point; free for one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["DistributedSettings", "any_process", "barrier", "first_host", "maybe_initialize",
           "resolve"]
