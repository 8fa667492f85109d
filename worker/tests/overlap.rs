//! The gradient all-reduce overlapped with backward (`collective::overlap`) against the same
//! reducer run after backward, on 2 gloo ranks (this test binary re-invoked once per rank over
//! loopback): after N steps of SGD with 2 micro-batches per step, the weights must be bitwise
//! equal, buckets must really start inside backward, and the parameters' hooks must be gone once
//! the reducer is dropped.

use eqim_worker::collective::overlap::GradientReducer;
use eqim_worker::collective::{GlooDevice, GroupOptions, ProcessGroup, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const ENV_RANK: &str = "EQIM_OVERLAP_TEST_RANK";
const ENV_PORT: &str = "EQIM_OVERLAP_TEST_PORT";
const WORLD: usize = 2;
const STEPS: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(30);

/// How a run's gradients are computed and reduced.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Gradients captured with `run_backward` (autograd.grad) into an accumulator, as the
    /// generator trains; the reducer armed for the last micro-batch.
    CapturedOverlapped,
    /// The same, all-reduced after backward.
    CapturedAfter,
    /// `.backward()` into `.grad`, as the synthetic model trains; armed.
    GradFieldOverlapped,
}

fn model(vs: &nn::VarStore) -> nn::Sequential {
    let root = vs.root();
    let mut seq = nn::seq();
    // Six layers of ~16k floats each: with 64 KiB buckets, several buckets per step.
    for i in 0..6 {
        seq = seq
            .add(nn::linear(
                &root / format!("l{i}"),
                128,
                128,
                Default::default(),
            ))
            .add_fn(|x| x.tanh());
    }
    seq
}

/// Rank-dependent data of micro-batch `m` of step `step`.
fn batch(rank: usize, step: usize, m: usize) -> (Tensor, Tensor) {
    let seed = (rank * 1000 + step * 10 + m) as i64;
    tch::manual_seed(seed);
    let x = Tensor::randn([8, 128], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([8, 128], (Kind::Float, Device::Cpu));
    (x, y)
}

/// Trains a fresh model (same initial weights on every rank) for STEPS steps; returns its
/// weights and the number of buckets launched inside backward over the run.
fn train(group: &ProcessGroup, rank: usize, mode: Mode) -> (Vec<Tensor>, usize) {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = model(&vs);
    let mut named = vs.variables().into_iter().collect::<Vec<_>>();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    let reducer = GradientReducer::with_bucket_bytes(group, &params, 16 * 1024, 64 * 1024)
        .expect("hook the parameters");
    assert!(reducer.plan().bucket_numels.len() >= 4, "several buckets");
    let mut early = 0;
    for step in 0..STEPS {
        let grads: Vec<Tensor> = match mode {
            Mode::GradFieldOverlapped => params
                .iter()
                .map(|p| {
                    let mut g = p.grad();
                    if !g.defined() {
                        (p * 0.0).sum(Kind::Float).backward();
                        g = p.grad();
                    }
                    let _ = g.zero_();
                    g
                })
                .collect(),
            _ => params.iter().map(|p| p.detach().zeros_like()).collect(),
        };
        let mut armed = None;
        for m in 0..2 {
            let (x, y) = batch(rank, step, m);
            let loss = (net.forward(&x) - y).square().mean(Kind::Float) * 0.5;
            let overlapped = !matches!(mode, Mode::CapturedAfter);
            if m == 1 && overlapped {
                armed = Some(reducer.arm(&grads).expect("arm"));
            }
            if let Mode::GradFieldOverlapped = mode {
                loss.backward();
            } else {
                let new = Tensor::run_backward(&[&loss], &params, false, false);
                let _no_grad = tch::no_grad_guard();
                for (acc, g) in grads.iter().zip(&new) {
                    let _ = acc.shallow_clone().g_add_(g);
                }
            }
        }
        early += reducer.finish(armed, &grads).expect("all-reduce");
        let _no_grad = tch::no_grad_guard();
        for (p, g) in params.iter().zip(&grads) {
            let _ = p.shallow_clone().g_sub_(&(g * 0.05));
        }
    }
    drop(reducer);
    // With the hooks removed, a backward pass no longer writes into any bucket: it still works.
    let (x, _) = batch(rank, 99, 0);
    net.forward(&x).sum(Kind::Float).backward();
    (params.iter().map(|p| p.detach().copy()).collect(), early)
}

fn run_rank(rank: usize, port: u16) {
    tch::set_num_threads(1);
    let store = Store::connect("127.0.0.1", port, TIMEOUT).expect("connect");
    let options = GroupOptions::gloo(rank, WORLD, TIMEOUT)
        .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()));
    let group = ProcessGroup::with_options(&store, &options).expect("group");
    let (after, early_after) = train(&group, rank, Mode::CapturedAfter);
    let (overlapped, early) = train(&group, rank, Mode::CapturedOverlapped);
    let (grad_field, early_field) = train(&group, rank, Mode::GradFieldOverlapped);
    assert_eq!(early_after, 0, "not armed: nothing starts inside backward");
    assert!(early > 0, "armed: buckets start inside backward");
    assert!(
        early_field > 0,
        "armed (.backward()): buckets start inside backward"
    );
    for (i, ((a, o), f)) in after.iter().zip(&overlapped).zip(&grad_field).enumerate() {
        assert!(
            a.equal(o),
            "parameter {i}: overlapped differs from after-backward"
        );
        assert!(a.equal(f), "parameter {i}: .backward() path differs");
    }
    // The ranks trained on different data: equal weights across ranks prove the reduction.
    let mut sum = Tensor::cat(
        &after.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(),
        0,
    );
    let mine = sum.copy();
    group.allreduce_sum(&mut sum).expect("compare ranks");
    assert!(
        (sum / WORLD as f64).equal(&mine),
        "ranks hold the same weights"
    );
    println!("measured: {early} bucket all-reduces of {STEPS} steps started inside backward");
    group.destroy().expect("destroy");
}

#[test]
fn overlapped_allreduce_matches_the_after_backward_one_bitwise() {
    if let Ok(rank) = std::env::var(ENV_RANK) {
        let port = std::env::var(ENV_PORT)
            .expect("port")
            .parse()
            .expect("port");
        return run_rank(rank.parse().expect("rank"), port);
    }
    let store = Store::host("127.0.0.1", 0, TIMEOUT).expect("host");
    let exe = std::env::current_exe().expect("exe");
    let children: Vec<_> = (0..WORLD)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "overlapped_allreduce_matches_the_after_backward_one_bitwise",
                    "--exact",
                    "--nocapture",
                ])
                .env(ENV_RANK, rank.to_string())
                .env(ENV_PORT, store.port().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait");
        assert!(Instant::now() < deadline, "rank {rank} took too long");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "rank {rank} failed:\n{text}");
        for line in text.lines().filter(|l| l.contains("measured:")) {
            println!("rank {rank} {line}");
        }
    }
}
