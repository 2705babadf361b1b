"""ddp_overhead_share: what running one cell as 2 ranks (`launcher.nproc=2`) costs beyond the
same cell on 1 rank with the same total work, less the communication no harness can avoid.

The cell is the demo's digits x test_vit.demo x classic_at x fft5 (augmentation off), clean and
Linf evaluation, with steps of 32 images on either world size (CELL): the same examples, steps,
updates and attacks on 1 or 2 ranks. Each run
is a fresh `rftbench launch` in its own interpreter, one torch thread per process, the world
sizes and lengths interleaved REPEATS times (the cores may be shared): medians.

The cost is counted in CPU seconds (the launcher and every rank, user + system): what a second
rank adds is work done twice plus time spent in collectives, whatever the cores do meanwhile
(wall seconds are printed too; `speedup` is what 2 ranks gain on this machine). It has a fixed
part, paid once per cell (a second interpreter importing torch, timm and the attacks, loading
the data and the model: `extra_rank_fixed_cpu_s`, a few seconds, nothing against a real cell's
hours), and a part that grows with training. The figure is the second: the cell is run for
EPOCHS[0] and EPOCHS[1] epochs, and the added epochs' CPU seconds compared.

communication   CPU seconds of the gradient all-reduces of the added epochs' updates (Gloo, 2
                processes on this machine, a buffer of all the model's parameters), timed alone
                and counted on both ranks: the unavoidable part.
figure          (2-rank CPU of the added epochs - 1-rank CPU of the added epochs - communication)
                / 1-rank CPU of the added epochs; goal <= 0.05.
"""
from __future__ import annotations

import os
import resource
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

# protocol.batch_size=32 (the demo's effective batch is 64): 1 rank steps on 32 images and
# accumulates 2 steps per update, each of 2 ranks steps on 32 once. The same steps: on a CPU a step
# of 32 costs ~15% more per image than one of 64, a difference of batch sizes, not of the harness.
CELL = ["study=demo", "model=test_vit.demo", "loss=classic_at", "protocol=fft5", "protocol.batch_size=32",
        "dataset.augment.rotation_degrees=0", "dataset.augment.color_jitter=0", "eval=[clean,linf]",
        "runtime.eval_batch_size=50"]
REPEATS = 3
EPOCHS = (1, 3)
ALL_REDUCE_REPEATS = 20


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def _launch_seconds(roots: dict[str, Path], nproc: int, epochs: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `rftbench launch` of the cell trained for `epochs` on `nproc` ranks,
    from a fresh results root, one torch thread per process."""
    shutil.rmtree(roots["results"], ignore_errors=True)
    roots["results"].mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **{f"RFTBENCH_{kind.upper()}": str(path) for kind, path in roots.items()}}
    cpu, start = _children_cpu_seconds(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmark.cli", "launch", *CELL, f"protocol.epochs={epochs}",
                    f"launcher.nproc={nproc}"],
                   cwd=PROJECT_DIR, env=env, check=True, capture_output=True)
    return time.perf_counter() - start, _children_cpu_seconds() - cpu


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
    seconds = torch.tensor([(time.perf_counter() - start) / repeats])
    dist.all_reduce(seconds)  # both ranks' time: each is busy (sending, waiting) for the whole call
    if rank == 0:
        out.write_text(str(seconds.item()))
    dist.destroy_process_group()


def _all_reduce_seconds(numel: int, folder: Path) -> float:
    """Seconds of one Gloo all-reduce of `numel` floats between 2 processes of this machine,
    summed over both."""
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
        updates = -(-len(splits.train) // (per_rank * steps * 2)) * (EPOCHS[1] - EPOCHS[0])
        communication = updates * _all_reduce_seconds(numel, Path(tmp))
        runs: dict[tuple[int, int], list[tuple[float, float]]] = {}
        _launch_seconds(roots, 1, EPOCHS[0])  # warm the file cache and the interpreter's compiled files
        for _ in range(REPEATS):
            for epochs in EPOCHS:
                for nproc in (1, 2):
                    runs.setdefault((nproc, epochs), []).append(_launch_seconds(roots, nproc, epochs))
    wall = {key: statistics.median(w for w, _ in values) for key, values in runs.items()}
    cpu = {key: statistics.median(c for _, c in values) for key, values in runs.items()}
    added = {nproc: cpu[nproc, EPOCHS[1]] - cpu[nproc, EPOCHS[0]] for nproc in (1, 2)}
    print(f"cpus={len(os.sched_getaffinity(0))}")
    print(f"load_average_1m={os.getloadavg()[0]:.2f}")
    print(f"gradient_numel={numel}")
    print(f"added_epochs={EPOCHS[1] - EPOCHS[0]}")
    print(f"added_updates={updates}")
    for (nproc, epochs), values in sorted(runs.items()):
        print(f"wall_{nproc}rank_{epochs}epochs_s={wall[nproc, epochs]:.2f}")
        print(f"cpu_{nproc}rank_{epochs}epochs_s={cpu[nproc, epochs]:.2f} ({','.join(f'{c:.2f}' for _, c in values)})")
    print(f"speedup_{EPOCHS[1]}epochs={wall[1, EPOCHS[1]] / wall[2, EPOCHS[1]]:.2f}")
    print(f"extra_rank_fixed_cpu_s={cpu[2, EPOCHS[0]] - cpu[1, EPOCHS[0]] - (added[2] - added[1]) / (EPOCHS[1] - EPOCHS[0]):.2f}")
    print(f"added_epochs_cpu_1rank_s={added[1]:.2f}")
    print(f"added_epochs_cpu_2ranks_s={added[2]:.2f}")
    print(f"communication_s={communication:.3f}")
    print(f"ddp_overhead_share={(added[2] - added[1] - communication) / added[1]:.3f}")

if __name__ == "__main__":
    main()
