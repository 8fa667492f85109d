#!/usr/bin/env python3
"""PIL stand-in for the reference's torchvision pipeline, for scripts/bench-loader.

Per image, as torchvision's ImageFolder + Resize(256) + RandomCrop(256) + RandomHorizontalFlip()
+ ToTensor() + Normalize(0.5, 0.5) do it: PIL open + convert("RGB"), bilinear resize of the
shorter side, random crop, flip with p=0.5, then (with numpy) float32 CHW in [-1, 1]. Without
numpy it stops at the uint8 image, which flatters PIL. One process, one core.
Usage: bench_loader_pil.py IMAGE_DIR [SIZE]
"""
import os
import random
import sys
import time

from PIL import Image

try:
    import numpy as np
except ImportError:  # the uint8-only variant still runs
    np = None


def files(root):
    out = []
    for cls in sorted(os.listdir(root)):
        d = os.path.join(root, cls)
        if os.path.isdir(d):
            out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    return out


def load(path, size, rng):
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = rng.randint(0, nh - size), rng.randint(0, nw - size)
    img = img.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if np is None:
        return img.tobytes()
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0
    return (x - 0.5) / 0.5


def main():
    root = sys.argv[1]
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    paths = files(root)
    rng = random.Random(0)
    for p in paths:  # warm the page cache, as the Rust bench does
        load(p, size, rng)
    start = time.perf_counter()
    for p in paths:
        load(p, size, rng)
    rate = len(paths) / (time.perf_counter() - start)
    print('{"pil_images": %d, "size": %d, "float_output": %s, "pil_single_thread_images_per_s": %.1f}'
          % (len(paths), size, "true" if np is not None else "false", rate))


if __name__ == "__main__":
    main()
