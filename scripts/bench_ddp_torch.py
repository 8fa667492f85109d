#!/usr/bin/env python3
"""PyTorch DDP side of scripts/bench-ddp, run under torchrun: the project's PyTorch baseline
generator (scripts/bench_generator_baseline.py) wrapped in DistributedDataParallel, trained with
the recipe eqim's workers use (AdamW with the reference's decay groups, grad-norm clipping, EMA)
on synthetic latents, same shapes and per-rank batch as eqim's side.

    torchrun --nproc_per_node 2 scripts/bench_ddp_torch.py --model tiny --batch 16 --warmup 10 --steps 100
    torchrun --nproc_per_node 2 scripts/bench_ddp_torch.py --model small --batch 4 --backend nccl

Rank 0 prints one JSON line: steps timed, seconds per step, samples/s over all ranks, and the
mean per-step split (forward, backward (with DDP's overlapped all-reduce), optimizer).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generator_baseline import Baseline, config_for, random_params  # noqa: E402


class Generator(nn.Module):
    """The baseline's flat parameter dict as registered parameters (dots become '__')."""

    def __init__(self, c, params):
        super().__init__()
        self.names = list(params)
        self.flat = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in params.items()})
        self.c = c

    def named(self):
        return {k: self.flat[k.replace(".", "__")] for k in self.names}

    def forward(self, x0, labels):
        return Baseline(self.c, self.named()).loss(x0, labels)


def decays(name, p):
    # eqim's (and the reference's add_weight_decay) rule: 1-D, *.bias and diffloss are not decayed.
    return not (p.dim() == 1 or name.endswith(".bias") or "diffloss" in name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: rank r on device r mod the device count (nccl needs cuda)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=3.0)
    ap.add_argument("--ema", type=float, default=0.999)
    a = ap.parse_args()
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = a.device == "cuda" or a.backend == "nccl"
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local % max(1, torch.cuda.device_count())}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_default_device(device)
    torch.manual_seed(0)
    c = config_for(a.model)
    model = Generator(c, random_params(c)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    named = model.named()
    groups = [
        {"params": [p for n, p in named.items() if decays(n, p)], "weight_decay": 0.02},
        {"params": [p for n, p in named.items() if not decays(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    torch.manual_seed(1 + rank)
    data = [(torch.randn(a.batch, a.tokens, c["C"]), torch.randint(0, c["classes"], (a.batch,))) for _ in range(8)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    split = {"forward": 0.0, "backward_with_allreduce": 0.0, "optimizer": 0.0}
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            dist.barrier()
            sync()
            start = time.perf_counter()
            split = dict.fromkeys(split, 0.0)
        x0, labels = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = ddp(x0, labels)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - a.ema)
        sync()
        t3 = time.perf_counter()
        split["forward"] += t1 - t0
        split["backward_with_allreduce"] += t2 - t1
        split["optimizer"] += t3 - t2
    sync()
    elapsed = time.perf_counter() - start
    if rank == 0:
        out = {"impl": "torch-ddp", "backend": a.backend, "device": str(device), "model": a.model, "world": world,
               "batch_per_rank": a.batch, "steps": a.steps, "threads": torch.get_num_threads(),
               "parameters": sum(p.numel() for p in params),
               "seconds_per_step": elapsed / a.steps,
               "samples_per_second": a.steps * a.batch * world / elapsed,
               "split_seconds_per_step": {k: v / a.steps for k, v in split.items()}}
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
