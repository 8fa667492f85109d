#!/usr/bin/env python3
"""PyTorch eager baseline for scripts/bench-generator, written for eqim from reference.md (§1).

It implements the reference generator's algorithm (windowed-causal RoPE blocks with cross-attention
to class tokens, AdaLN flow head, rectified-flow loss, Euler sampling with full recompute per token)
with torch.nn.functional ops on a flat dict of parameters named as the reference's state_dict.

    bench_generator_baseline.py check PREFIX            # proves equality with a parity fixture
    bench_generator_baseline.py train  --model tiny --batch 8
    bench_generator_baseline.py sample --model small --tokens 16 --batch 4 --steps 100 --cfg 4
    bench_generator_baseline.py train  --model base --batch 64 --device cuda --precision bf16

--device cuda puts every tensor on the GPU (torch.set_default_device) and adds the median time,
images/s and the peak of torch.cuda.max_memory_allocated() to the JSON line; --precision bf16 runs
the forward under torch.autocast (float32 weights), as eqim's bf16.

Prints one JSON line per run, like eqim's `bench_generator` example.
"""
import argparse
import json
import math
import struct
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {  # D, blocks, heads, W (README settings: C 256, buffer 16, cond_length 3, head depth 12)
    "small": (512, 16, 8, 960),
    "base": (768, 24, 12, 1024),
    "large": (1024, 32, 16, 1280),
    "huge": (1280, 40, 16, 1536),
}


def config_for(name):
    if name == "tiny":
        return dict(D=64, blocks=2, heads=4, W=64, C=16, NB=16, cond=3, depth=2, classes=10, eps=1e-6)
    d, blocks, heads, w = PRESETS[name]
    return dict(D=d, blocks=blocks, heads=heads, W=w, C=256, NB=16, cond=3, depth=12, classes=1000, eps=1e-6)


def config_from_json(j):
    return dict(
        D=j["encoder_embed_dim"], blocks=j["encoder_depth"] + j["decoder_depth"],
        heads=j["encoder_num_heads"], W=j["diffloss_w"], C=j["vae_embed_dim"], NB=j["buffer_size"],
        cond=j["cond_length"], depth=j["diffloss_d"], classes=j["class_num"], eps=j.get("norm_eps", 1e-6),
    )


def read_safetensors(path):
    dtypes = {"F32": torch.float32, "I64": torch.int64, "F64": torch.float64}
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        t = torch.frombuffer(buf, dtype=dtypes[info["dtype"]]) if b > a else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[key] = t.reshape(info["shape"]).clone()
    return out


def random_params(c):
    D, W, C, hidden = c["D"], c["W"], c["C"], 4 * c["D"]
    shapes = {
        "fake_latent": [1, D], "encoder_pos_embed_learned": [1, c["NB"], D], "class_emb.weight": [c["classes"], D],
        "z_proj.weight": [D, C], "z_proj.bias": [D], "z_proj_ln.weight": [D], "z_proj_ln.bias": [D],
        "encoder_norm.weight": [D], "encoder_norm.bias": [D],
    }
    for i in range(c["blocks"]):
        p = f"encoder_blocks.{i}."
        for name, (o, k) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D), "mlp.fc1": (hidden, D), "mlp.fc2": (D, hidden),
                             "attn2.qkv": (D, D), "attn2.proj": (D, D), "attn2.k": (D, D), "attn2.v": (D, D)}.items():
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = [o, k], [o]
        for name in ["norm1", "norm2", "cross_norm", "cross_cond_norm"]:
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = [D], [D]
    h = "diffloss.net."
    lin = {"time_embed.mlp.0": (W, 256), "time_embed.mlp.2": (W, W), "cond_embed": (W, D), "input_proj": (W, C),
           "final_layer.linear": (C, W), "final_layer.adaLN_modulation.1": (2 * W, W)}
    for j in range(c["depth"]):
        r = f"res_blocks.{j}."
        lin.update({r + "mlp.0": (W, W), r + "mlp.2": (W, W), r + "adaLN_modulation.1": (3 * W, W)})
        shapes[h + r + "in_ln.weight"], shapes[h + r + "in_ln.bias"] = [W], [W]
    for name, (o, k) in lin.items():
        shapes[h + name + ".weight"], shapes[h + name + ".bias"] = [o, k], [o]
    return {k: (torch.randn(s) * 0.02) for k, s in shapes.items()}


class Baseline:
    def __init__(self, c, params):
        self.c, self.p = c, params

    def lin(self, x, name):
        return F.linear(x, self.p[name + ".weight"], self.p[name + ".bias"])

    def ln(self, x, name, eps):
        return F.layer_norm(x, (x.shape[-1],), self.p[name + ".weight"], self.p[name + ".bias"], eps)

    def rope(self, n, hd, shift):
        freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        ang = torch.outer(torch.arange(n) + shift, freqs)
        return torch.view_as_real(torch.polar(torch.ones_like(ang), ang))  # [n, hd/2, 2]

    @staticmethod
    def rotate(x, tab):  # x [B, N, H, hd]
        xs = x.float().reshape(*x.shape[:-1], -1, 2)
        t = tab.view(1, xs.size(1), 1, xs.size(3), 2)
        out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                           xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], -1)
        return out.flatten(3)

    def block(self, i, x, mask, tab, train):
        c, p = self.c, f"encoder_blocks.{i}."
        B, N, D = x.shape
        H, nb = c["heads"], c["NB"]
        hd = D // H
        drop = 0.1 if train else 0.0
        cond, img = x[:, :nb], x[:, nb:]
        L = img.shape[1]
        qkv = self.lin(self.ln(img, p + "norm1", c["eps"]), p + "attn.qkv").reshape(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.rotate(q.permute(0, 2, 1, 3), tab).permute(0, 2, 1, 3)
        k = self.rotate(k.permute(0, 2, 1, 3), tab).permute(0, 2, 1, 3)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], dropout_p=drop)
        img = img + F.dropout(self.lin(a.transpose(1, 2).reshape(B, L, D), p + "attn.proj"), drop, train)
        xn, cn = self.ln(img, p + "cross_norm", 1e-5), self.ln(cond, p + "cross_cond_norm", 1e-5)
        q = self.lin(xn, p + "attn2.qkv").reshape(B, L, H, hd).permute(0, 2, 1, 3)
        k = self.lin(cn, p + "attn2.k").reshape(B, nb, H, hd).permute(0, 2, 1, 3)
        v = self.lin(cn, p + "attn2.v").reshape(B, nb, H, hd).permute(0, 2, 1, 3)
        q = self.rotate(q.permute(0, 2, 1, 3), tab).permute(0, 2, 1, 3)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        img = img + F.dropout(self.lin(a.transpose(1, 2).reshape(B, L, D), p + "attn2.proj"), drop, train)
        x = torch.cat([cond, img], 1)
        h = F.gelu(self.lin(self.ln(x, p + "norm2", c["eps"]), p + "mlp.fc1"))
        return x + F.dropout(self.lin(F.dropout(h, drop, train), p + "mlp.fc2"), drop, train)

    def encoder(self, tokens, ce, train=False):
        c = self.c
        B, L, _ = tokens.shape
        if train:
            m = (torch.rand(B) < 0.1).unsqueeze(-1).to(tokens.dtype)
            ce = m * self.p["fake_latent"] + (1 - m) * ce
        x = self.lin(tokens, "z_proj")
        x = torch.cat([ce.unsqueeze(1) + self.p["encoder_pos_embed_learned"], x], 1)
        x = F.layer_norm(x, (c["D"],), self.p["z_proj_ln.weight"], self.p["z_proj_ln.bias"], 1e-6)
        i = torch.arange(L)
        rel = i[:, None] - i[None, :]
        mask = (rel >= 0) & ((rel <= c["cond"]) if c["cond"] > 0 else True)
        shift = int(torch.randint(0, 16, (1,))) if train else 0
        tab = self.rope(L, c["D"] // c["heads"], shift)
        for b in range(c["blocks"]):
            x = self.block(b, x, mask, tab, train)
        x = self.ln(x, "encoder_norm", c["eps"])
        return x[:, c["NB"] - 1:-1]

    def head(self, x, t, z):
        h = "diffloss.net."
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        temb = self.lin(F.silu(self.lin(temb, h + "time_embed.mlp.0")), h + "time_embed.mlp.2")
        y = temb + self.lin(z, h + "cond_embed")
        x = self.lin(x, h + "input_proj")
        W = x.shape[-1]
        for j in range(self.c["depth"]):
            r = h + f"res_blocks.{j}."
            shift, scale, gate = self.lin(F.silu(y), r + "adaLN_modulation.1").chunk(3, -1)
            a = F.layer_norm(x, (W,), self.p[r + "in_ln.weight"], self.p[r + "in_ln.bias"], 1e-6) * (1 + scale) + shift
            x = x + gate * self.lin(F.silu(self.lin(a, r + "mlp.0")), r + "mlp.2")
        shift, scale = self.lin(F.silu(y), h + "final_layer.adaLN_modulation.1").chunk(2, -1)
        x = F.layer_norm(x, (W,), eps=1e-6) * (1 + scale) + shift
        return self.lin(x, h + "final_layer.linear")

    def head_cfg(self, x, t, z, scale):
        half = x[: len(x) // 2]
        out = self.head(torch.cat([half, half]), t, z)
        cond, uncond = out.split(len(out) // 2)
        v = uncond + scale * (cond - uncond)
        return torch.cat([v, v])

    def loss(self, x0, labels, noise=None, t_raw=None, train=True):
        B, L, C = x0.shape
        z = self.encoder(x0, F.embedding(labels, self.p["class_emb.weight"]), train)
        target = x0.reshape(B * L, -1).repeat(4, 1)
        z = z.reshape(B * L, -1).repeat(4, 1)
        noise = torch.randn_like(target) if noise is None else noise
        t = (torch.rand(target.shape[0], 1) if t_raw is None else t_raw) * (1 - 1e-5) + 1e-5
        z_t = t * noise + (1.0 - t) * target
        pred = self.head(z_t, t.squeeze(), z)
        return ((noise - target - pred) ** 2).mean(-1).mean()

    @torch.no_grad()
    def sample(self, labels, num_iter, cfg, steps, noises):
        B, C = labels.shape[0], self.c["C"]
        tokens = torch.zeros(B, num_iter, C)
        ce = F.embedding(labels, self.p["class_emb.weight"])
        fake = self.p["fake_latent"].repeat(B, 1)
        for step in range(num_iter):
            seq, ce2 = (torch.cat([tokens, tokens]), torch.cat([ce, fake])) if cfg != 1.0 else (tokens, ce)
            z = self.encoder(seq, ce2)[:, step]
            scale = 1 + (cfg - 1) * (step + 1.0) / num_iter
            noise = noises[step]
            x = torch.cat([noise, noise]) if scale != 1.0 else noise
            for i in range(steps, 0, -1):
                t = torch.ones(x.shape[0], 1) * i / steps
                v = self.head_cfg(x, t.squeeze(1), z, scale) if scale != 1.0 else self.head(x, t.squeeze(1), z)
                x = x + v * (-1.0 / steps)
            tokens = tokens.clone()
            tokens[:, step] = x[:B]
        return tokens


def check(prefix):
    j = json.load(open(prefix + ".json"))
    io = read_safetensors(prefix + ".io.safetensors")
    m = Baseline(config_from_json(j), read_safetensors(prefix + ".weights.safetensors"))
    emb = lambda l: F.embedding(l, m.p["class_emb.weight"])
    with torch.no_grad():
        errs = {
            "encoder": m.encoder(io["encoder.tokens"], emb(io["encoder.labels"])) - io["encoder.out"],
            "encoder_long": m.encoder(io["encoder_long.tokens"], emb(io["encoder.labels"])) - io["encoder_long.out"],
            "head": m.head(io["head.x"], io["head.t"], io["head.c"]) - io["head.out"],
            "head_cfg": m.head_cfg(io["head_cfg.x"], io["head.t"], io["head.c"], float(io["head_cfg.scale"])) - io["head_cfg.out"],
            "loss": m.loss(io["loss.x0"], io["loss.labels"], io["loss.noise"], io["loss.t_raw"], train=False) - io["loss.value"],
            "sample": m.sample(io["sample.labels"], io["sample.tokens"].shape[1], float(io["sample.cfg"]),
                               int(io["sample.steps"]), io["sample.step_noise"]) - io["sample.tokens"],
        }
    worst = 0.0
    for k, e in errs.items():
        err = float(e.abs().max())
        worst = max(worst, err)
        print(f"baseline {k:<14} max abs err {err:.3e}")
    if worst > 1e-5:
        sys.exit("the baseline does not match the fixture")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["check", "train", "sample"])
    ap.add_argument("prefix", nargs="?")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    if a.what == "check":
        return check(a.prefix)
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.set_default_device(a.device)
        # eqim's libtorch keeps cuBLAS out of TF32 by default (as torch does); say so explicitly.
        torch.backends.cuda.matmul.allow_tf32 = False
    dev_type = "cuda" if cuda else "cpu"
    autocast = torch.autocast(dev_type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    c = config_for(a.model)
    m = Baseline(c, random_params(c))
    labels = torch.arange(a.batch) % c["classes"]
    times = []
    if a.what == "train":
        params = list(m.p.values())
        for t in params:
            t.requires_grad_(True)
        x0 = torch.randn(a.batch, a.tokens, c["C"])
        for i in range(a.iters + 1):
            if i == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            with autocast:
                loss = m.loss(x0, labels)
            loss.float().backward()  # forward + backward only, as eqim's side
            sync()
            times.append(time.perf_counter() - start)
        times = times[1:]
    else:
        for _ in range(a.iters):
            noises = torch.randn(a.tokens, a.batch, c["C"])
            sync()
            start = time.perf_counter()
            with autocast:
                m.sample(labels, a.tokens, a.cfg, a.steps, noises)
            sync()
            times.append((time.perf_counter() - start) / a.batch)
    out = {"impl": "torch", "what": a.what, "model": a.model, "batch": a.batch, "tokens": a.tokens,
           "seconds": round(min(times), 4), "threads": torch.get_num_threads()}
    if cuda or a.precision != "fp32":
        median = sorted(times)[len(times) // 2]
        out.update(device=a.device, precision=a.precision, median_seconds=median,
                   images_per_second=(a.batch / median if a.what == "train" else 1.0 / median))
        if cuda:
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
