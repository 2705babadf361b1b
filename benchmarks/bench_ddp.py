"""ddp_overhead_share: what running one cell as 2 ranks (`launcher.nproc=2`) costs beyond the
same cell on 1 rank with the same total work, less the communication no harness can avoid.

The cell is the demo's digits x test_vit.demo x classic_at x fft5 (augmentation off), clean and
Linf evaluation. 1 rank runs with every core of the machine as its torch threads; 2 ranks share
them (launcher.nproc=2 gives each half): same examples, same total work. Each run is a fresh
`rftbench launch` in its own interpreter, timed from start to exit, the two world sizes
interleaved REPEATS times (the cores may be shared): medians.

communication   the gradient all-reduces of the cell's updates (Gloo, 2 processes on this
                machine, a buffer of the model's trainable parameters), timed alone: the
                unavoidable part.
figure          (median 2-rank wall - median 1-rank wall - communication) / median 1-rank wall;
                goal <= 0.05.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmark import data, models
from benchmark.distributed import batch_sizes
from benchmark.paths import PROJECT_DIR
from benchmark.study import plan

CELL = ["study=demo", "model=test_vit.demo", "loss=classic_at", "protocol=fft5", "dataset.augment.rotation_degrees=0",
        "dataset.augment.color_jitter=0", "eval=[clean,linf]", "runtime.eval_batch_size=50"]
REPEATS = 3
ALL_REDUCE_REPEATS = 20


def _launch_seconds(roots: dict[str, Path], nproc: int) -> float:
    """Wall seconds of `rftbench launch` of the cell on `nproc` ranks, from a fresh results root."""
    shutil.rmtree(roots["results"], ignore_errors=True)
    roots["results"].mkdir()
    env = {**os.environ, **{f"RFTBENCH_{kind.upper()}": str(path) for kind, path in roots.items()}}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmark.cli", "launch", *CELL, f"launcher.nproc={nproc}"],
                   cwd=PROJECT_DIR, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _all_reduce_rank(rank: int, port: int, numel: int, repeats: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    buffer = torch.ones(numel)
    dist.all_reduce(buffer)  # warm the connection
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buffer)
        buffer /= 2
    if rank == 0:
        out.write_text(str((time.perf_counter() - start) / repeats))
    dist.destroy_process_group()


def _all_reduce_seconds(numel: int, folder: Path) -> float:
    """Seconds of one Gloo all-reduce of `numel` floats between 2 processes of this machine."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = folder / "all_reduce_seconds"
    mp.spawn(_all_reduce_rank, args=(port, numel, ALL_REDUCE_REPEATS, out), nprocs=2)
    return float(out.read_text())


def main() -> None:
    config = plan(CELL).cells[0].config
    with tempfile.TemporaryDirectory() as tmp:
        roots = {kind: Path(tmp) / kind for kind in ("results", "data", "weights")}
        for path in roots.values():
            path.mkdir()
        splits = data.load_splits(config["dataset"], roots["data"])
        models.make_demo_weights(config["model"], roots["weights"])
        model = models.create_model(config["model"], splits.num_classes, roots["weights"])
        numel = sum(p.numel() for p in model.parameters())
        per_rank, steps = batch_sizes(config["protocol"], 2)
        updates = -(-len(splits.train) // (per_rank * steps * 2)) * config["protocol"]["epochs"]
        communication = updates * _all_reduce_seconds(numel, Path(tmp))
        walls: dict[int, list[float]] = {1: [], 2: []}
        _launch_seconds(roots, 1)  # warm the file cache and the interpreter's compiled files
        for _ in range(REPEATS):
            for nproc in (1, 2):
                walls[nproc].append(_launch_seconds(roots, nproc))
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"cpus={len(os.sched_getaffinity(0))}")
    print(f"load_average_1m={os.getloadavg()[0]:.2f}")
    print(f"updates={updates}")
    print(f"gradient_numel={numel}")
    print(f"wall_1rank_s={one:.2f}")
    print(f"wall_2ranks_s={two:.2f}")
    print(f"walls_1rank_s={','.join(f'{w:.2f}' for w in walls[1])}")
    print(f"walls_2ranks_s={','.join(f'{w:.2f}' for w in walls[2])}")
    print(f"communication_s={communication:.3f}")
    print(f"ddp_overhead_share={(two - one - communication) / one:.3f}")


if __name__ == "__main__":
    main()
