#!/usr/bin/env python3
"""torch.distributed side of scripts/bench-allreduce, run under torchrun: times in-place SUM
all-reduce of N float32 elements the way `eqim bench-allreduce` does (fill, barrier, time one
all-reduce; median over the timed iterations) and prints the same line format, prefixed torch.

    torchrun --standalone --nproc_per_node 2 scripts/bench_allreduce_torch.py --floats 64000000 --iters 5
"""
import argparse
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--floats", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    a = ap.parse_args()
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % max(1, torch.cuda.device_count())}" if a.backend == "nccl" else "cpu")
    t = torch.ones(a.floats, dtype=torch.float32, device=device)
    times = []
    for i in range(a.warmup + a.iters):
        t.fill_(1.0)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= a.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    got = float(t[-1])
    assert got == world, f"wrong all-reduce result {got}, expected {world}"
    if rank == 0:
        times.sort()
        median = times[len(times) // 2]
        mb = a.floats * 4 / 1e6
        print(f"torch allreduce {a.backend} world={world} floats={a.floats} ({mb:.1f} MB) iters={a.iters}: "
              f"median {median:.2f} ms, min {times[0]:.2f} ms, max {times[-1]:.2f} ms, "
              f"algbw {mb / 1e3 / (median / 1e3):.2f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
