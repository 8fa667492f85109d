#!/usr/bin/env python3
"""Driver of scripts/bench-ddp: eqim's distributed step (`eqim launch`, coordinator + W workers)
against PyTorch DDP (`torchrun`, scripts/bench_ddp_torch.py) on the same generator shapes,
per-rank batch and number of timed steps after warm-up, runs alternating eqim / DDP.

eqim's throughput and split come from worker 0's Prometheus /metrics, read when the job passes
the warm-up and again after the timed steps: samples/s = steps x global batch / wall time, and
per step forward+backward (data, forward, backward), all-reduce not overlapped with backward,
optimizer, and the rest of the wall time per step, which is the coordinator's vote round trip
(vote, commit, and waiting for the slowest rank).

Prints a markdown table and one JSON line per run (prefixed "json: ").
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = """encoder_embed_dim = 64
encoder_depth = 1
encoder_num_heads = 4
decoder_embed_dim = 64
decoder_depth = 1
decoder_num_heads = 4
vae_embed_dim = 16
token_num = 16
buffer_size = 16
cond_length = 3
class_num = 10
diffloss_d = 2
diffloss_w = 64
diffusion_batch_mul = 4
"""
SMALL_MODEL = 'preset = "small"\n'


def free_port(count):
    """A base port with `count` consecutive free TCP ports on loopback."""
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        s.close()
        if base + count >= 65535:
            continue
        ok = True
        for p in range(base, base + count):
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return base
    sys.exit("bench-ddp: no free ports on 127.0.0.1")


def write_job(tmp, model, batch, world, steps, device):
    glob = batch * world
    samples = glob * steps
    train = os.path.join(tmp, "train.toml")
    with open(train, "w") as f:
        f.write(f"""seed = 1
device = "{device}"
threads = 1
output_dir = "{tmp}/out"
[model]
{TINY_MODEL if model == "tiny" else SMALL_MODEL}
[data]
kind = "synthetic"
samples = {samples}
noise = 0.1
[optim]
batch = {glob}
micro_batch = {batch}
blr = 0.016
warmup_epochs = 1.0
schedule = "constant"
weight_decay = 0.02
betas = [0.9, 0.95]
clip_grad = 3.0
ema_rate = 0.999
[run]
epochs = 1
checkpoint_every = 0
log_every = 1000000
""")
    coord = os.path.join(tmp, "coordinator.yaml")
    with open(coord, "w") as f:
        f.write(f"""bind: 127.0.0.1:0
job_dir: {tmp}/job
expected_workers: {world}
min_workers: {world}
max_workers: {world}
timeouts:
  heartbeat_interval: 0.5
  heartbeat_timeout: 30.0
  quic_idle_timeout: 30.0
  handshake_timeout: 30.0
  join_timeout: 300.0
  rendezvous_timeout: 300.0
  step_timeout: 900.0
  probe_timeout: 0.5
  decision_tick_interval: 0.1
schedule:
  dataset_len: {samples}
  global_batch: {glob}
  micro_batch: {batch}
  epochs: 1
  seed: 1
  checkpoint_every_steps: 1000000
""")
    return train, coord


def scrape(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(eqim_steps_total|eqim_step_phase_duration_seconds_sum)(?:\{(?:phase="(\w+)")?[^}]*\})? (\S+)$', line)
        if m:
            out[m.group(2) or "steps"] = float(m.group(3))
    return out if "steps" in out else None


def kill_cluster(pid):
    """SIGKILLs `eqim launch` (pid) and its children, each the leader of its own process group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            try:
                os.killpg(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.killpg(pid, signal.SIGKILL)


def run_eqim(a, model, batch, world, warmup, steps):
    tmp = tempfile.mkdtemp(prefix="bench-ddp-")
    try:
        train, coord = write_job(tmp, model, batch, world, warmup + steps + max(3, steps // 4), a.device)
        # (The job is longer than the timed steps so that it is still running at the last read.)
        base = free_port(world + 1)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        if a.no_overlap:
            env["EQIM_OVERLAP_ALLREDUCE"] = "0"
        env["EQIM_COLLECTIVE_BACKEND"] = a.backend
        cmd = [a.eqim, "launch", "--config", coord, "--workers", str(world), "--train-config", train,
               "--metrics-base-port", str(base), "--export-dir", os.path.join(tmp, "export")]
        log = open(os.path.join(tmp, "launch.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        first = last = None
        deadline = time.time() + a.timeout
        while proc.poll() is None and time.time() < deadline:
            snap = scrape(base + 1)
            now = time.perf_counter()
            if snap:
                if first is None and snap["steps"] >= warmup:
                    first = (now, snap)
                elif first is not None and snap["steps"] >= warmup + steps:
                    last = (now, snap)
                    break
            time.sleep(0.05)
        # Measured: stop the job at once (SIGKILL, so no worker writes a just-in-time
        # checkpoint and rank 0 no export: gigabytes for the small model).
        if proc.poll() is None:
            kill_cluster(proc.pid)
        rc = proc.wait(timeout=120)
        log.close()
        if last is None:
            tail = open(os.path.join(tmp, "launch.log"), errors="replace").read()[-3000:]
            sys.exit(f"bench-ddp: eqim run failed or timed out (rc {rc}):\n{tail}")
        (t0, s0), (t1, s1) = first, last
        n = s1["steps"] - s0["steps"]
        wall = (t1 - t0) / n
        per = {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / n for k in s1 if k != "steps"}
        fwd_bwd = per.get("data_wait", 0) + per.get("forward", 0) + per.get("backward", 0)
        split = {"forward_backward": fwd_bwd, "allreduce_not_overlapped": per.get("allreduce", 0.0),
                 "optimizer": per.get("optimizer", 0.0)}
        split["coordinator_vote"] = max(0.0, wall - sum(split.values()))
        return {"impl": "eqim", "backend": a.backend, "device": a.device, "model": model, "world": world, "batch_per_rank": batch, "steps": n,
                "overlap": not a.no_overlap, "seconds_per_step": wall,
                "samples_per_second": batch * world / wall, "split_seconds_per_step": split}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_ddp(a, model, batch, world, warmup, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [a.python, "-W", "ignore", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           os.path.join(ROOT, "scripts", "bench_ddp_torch.py"), "--model", model, "--batch", str(batch),
           "--warmup", str(warmup), "--steps", str(steps), "--backend", a.backend,
           "--device", "cuda" if a.device.startswith("cuda") else "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"bench-ddp: torchrun failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eqim", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--rows", default="tiny:16:20:200,small:4:2:8", help="MODEL:BATCH:WARMUP:STEPS,...")
    ap.add_argument("--worlds", default="2,3")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--device", default="cpu", help="eqim's training device (cpu, cuda); DDP follows")
    ap.add_argument("--no-overlap", action="store_true", help="eqim with EQIM_OVERLAP_ALLREDUCE=0")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    load = open("/proc/loadavg").read().split()[:3]
    print(f"bench-ddp: load average {' '.join(load)} on {os.cpu_count()} cores; backend {a.backend}, "
          f"1 intra-op thread per process, eqim overlap {'off' if a.no_overlap else 'on'}", flush=True)
    table = []
    for row in a.rows.split(","):
        model, batch, warmup, steps = row.split(":")
        batch, warmup, steps = int(batch), int(warmup), int(steps)
        for world in [int(w) for w in a.worlds.split(",")]:
            for rep in range(a.reps):
                e = run_eqim(a, model, batch, world, warmup, steps)
                print("json: " + json.dumps(e), flush=True)
                t = run_ddp(a, model, batch, world, warmup, steps)
                print("json: " + json.dumps(t), flush=True)
                table.append((model, batch, world, rep, t, e))
    print("\n| model | W | batch/rank | rep | DDP samples/s | eqim samples/s | eqim/DDP | eqim fwd+bwd | eqim all-reduce (not overlapped) | eqim vote | eqim optimizer | DDP fwd | DDP bwd+all-reduce | DDP optimizer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, batch, world, rep, t, e in table:
        s, d = e["split_seconds_per_step"], t["split_seconds_per_step"]
        ms = lambda v: f"{v * 1e3:.1f} ms"
        print(f"| {model} | {world} | {batch} | {rep + 1} | {t['samples_per_second']:.1f} | {e['samples_per_second']:.1f} | "
              f"{e['samples_per_second'] / t['samples_per_second']:.2f}x | {ms(s['forward_backward'])} | "
              f"{ms(s['allreduce_not_overlapped'])} | {ms(s['coordinator_vote'])} | {ms(s['optimizer'])} | "
              f"{ms(d['forward'])} | {ms(d['backward_with_allreduce'])} | {ms(d['optimizer'])} |")
    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nbench-ddp: load average after {' '.join(load)}")


if __name__ == "__main__":
    main()
