"""Data parallelism inside one cell: the ranks of a cell, found from torch.distributed's standard
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which the
launcher sets (the local launcher for each process it spawns, the SLURM launcher from submitit's
distributed environment). Without them a cell is one rank of a group of one, and nothing here
touches torch.distributed.

What the ranks share, and what they do not:
- Gradients are summed across ranks and divided by their number before each optimizer step
  (`average_gradients`), so every rank takes the same step with the same weights.
- BatchNorm statistics stay per rank, as in the published study (plain DDP, no SyncBatchNorm):
  each rank's running statistics follow its own examples. The checkpoint keeps rank 0's, and
  before evaluation every rank takes rank 0's (`broadcast_state`), so the evaluated model is the
  checkpointed one whatever the number of ranks.
- Rank 0 is the one writer of the cell's checkpoint, state, heartbeat, log and rows (the
  resumable AutoAttack state of an evaluation batch is written by the rank evaluating it). A
  rank that fails leaves its reason in `rank<r>.failure.json` (`record_failure`) so that rank 0,
  failing in turn at its next collective, can report the rank that failed first (`peer_failure`).

Collective operations time out after `connect`'s `timeout_s` (runtime.collective_timeout_s): a
rank that hangs fails the cell instead of blocking it; a rank that dies breaks its peers' next
collective at once. Gloo on the CPU, NCCL on CUDA.
"""
from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmark.atomic import write_json_atomic
from benchmark.errors import RFTBenchError

ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one cell. A group of one never communicates."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Whether this rank writes the cell's files (rank 0 only)."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's positions among `n` items: r, r + N, r + 2N, ... (DistributedSampler's)."""
        return range(self.rank, n, self.world_size)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks, in one collective call."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if self.world_size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over the ranks (a new tensor; `values` itself is left alone)."""
        total = values.clone()
        if self.world_size > 1:
            dist.all_reduce(total)
        return total

    def broadcast_state(self, model: nn.Module) -> None:
        """Every rank's parameters and buffers (BatchNorm statistics) made rank 0's."""
        if self.world_size == 1:
            return
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def gather(self, pieces: dict[int, Any]) -> dict[int, Any]:
        """Every rank's `pieces` (keyed by disjoint ints, e.g. batch indices) merged, on every rank."""
        if self.world_size == 1:
            return dict(pieces)
        everyone: list[dict[int, Any] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, pieces)
        return {key: value for part in everyone for key, value in part.items()}

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Group()


def from_environment() -> Group:
    """This process's group, from the environment variables: a group of one when WORLD_SIZE is
    unset or 1. Nothing is connected yet (`connect`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    missing = [name for name in ENV_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: the launcher must set all "
                           f"of {', '.join(ENV_VARIABLES)}")
    return Group(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]))


def connect(group: Group, device: torch.device, timeout_s: float) -> None:
    """Initialise the process group of `group` (nothing for a group of one): Gloo on the CPU,
    NCCL on CUDA, collectives timing out after `timeout_s`."""
    if group.world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=group.rank, world_size=group.world_size, timeout=timedelta(seconds=timeout_s))


def rank_seed(seed: int, group: Group) -> int:
    """The seed of this rank's random draws (augmentation, random attack starts): rank 0 keeps
    `seed`, so a group of one draws as a single process does; the others draw their own."""
    return seed + 1_000_003 * group.rank


def rank_device(device: torch.device, group: Group) -> torch.device:
    """The device of this rank: on CUDA the GPU of its local rank, else `device`."""
    if device.type != "cuda" or group.world_size == 1:
        return device
    torch.cuda.set_device(group.local_rank)
    return torch.device("cuda", group.local_rank)


def batch_sizes(protocol: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(examples per step on each rank, steps per update) such that an update sees the protocol's
    `effective_batch_size` examples counting every rank: each rank steps on
    min(batch_size, effective_batch_size / N) examples. RFTBenchError when they do not divide."""
    effective, largest = protocol["effective_batch_size"], protocol["batch_size"]
    per_rank_update, remainder = divmod(effective, world_size)
    if remainder or per_rank_update < 1:
        raise RFTBenchError(f"protocol {protocol['name']!r}: effective_batch_size {effective} is not a multiple of "
                         f"the {world_size} ranks")
    step = min(largest, per_rank_update)
    steps, remainder = divmod(per_rank_update, step)
    if remainder:
        raise RFTBenchError(f"protocol {protocol['name']!r}: effective_batch_size {effective} must be a multiple of "
                         f"batch_size {largest} times the {world_size} ranks")
    return step, steps


# --- failures ---------------------------------------------------------------------------------

def failure_file(cell_dir: Path, rank: int) -> Path:
    return cell_dir / f"rank{rank}.failure.json"


def clear_failure(cell_dir: Path, group: Group) -> None:
    """Forget this rank's failure of an earlier attempt."""
    failure_file(cell_dir, group.rank).unlink(missing_ok=True)


def record_failure(cell_dir: Path, group: Group, err: BaseException) -> None:
    """Leave this rank's reason (and traceback) for rank 0 and the launcher."""
    write_json_atomic(failure_file(cell_dir, group.rank),
                      {"rank": group.rank, "reason": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()})


def peer_failure(cell_dir: Path, group: Group) -> dict[str, Any] | None:
    """The failure another rank of this attempt recorded (the lowest rank's), or None."""
    for rank in range(group.world_size):
        path = failure_file(cell_dir, rank)
        if rank != group.rank and path.exists():
            return json.loads(path.read_text())
    return None
