//! Multi-process tests of the c10d data plane over loopback: each test re-invokes this test
//! binary once per rank (the rank is chosen by environment variables), the parent hosts the
//! TCPStore, and children report through their exit status; their logs are shown on failure and
//! their `measured:` lines are echoed (see them with `-- --nocapture`).

use eqim_worker::collective::ddp::{broadcast_var_store, GradientBuckets};
use eqim_worker::collective::{GlooDevice, GroupOptions, ProcessGroup, Store};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const ENV_RANK: &str = "EQIM_TEST_RANK";
const ENV_WORLD: &str = "EQIM_TEST_WORLD";
const ENV_STORE_PORT: &str = "EQIM_TEST_STORE_PORT";
/// Bounds the store's waits (rendezvous included).
const STORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole multi-process test may take before its children are killed.
const TEST_DEADLINE: Duration = Duration::from_secs(90);

/// Who this process is when it runs as a rank of a test.
struct Me {
    rank: usize,
    world: usize,
    store_port: u16,
}

impl Me {
    fn from_env() -> Option<Self> {
        let rank = std::env::var(ENV_RANK).ok()?;
        let world = std::env::var(ENV_WORLD).expect("world set with rank");
        let port = std::env::var(ENV_STORE_PORT).expect("store port set with rank");
        // Ranks share 2 cores with each other: keep libtorch to one thread each.
        tch::set_num_threads(1);
        Some(Self {
            rank: rank.parse().expect("rank is a number"),
            world: world.parse().expect("world is a number"),
            store_port: port.parse().expect("port is a number"),
        })
    }

    fn store(&self) -> Store {
        Store::connect("127.0.0.1", self.store_port, STORE_TIMEOUT).expect("connect to the store")
    }
}

fn loopback_group(
    store: &Store,
    prefix: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> ProcessGroup {
    let view = store.prefixed(prefix).expect("prefix store");
    let options = GroupOptions::gloo(rank, world, timeout)
        .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()));
    ProcessGroup::with_options(&view, &options).expect("form the group")
}

/// The parent's view of a running multi-process test.
struct Cluster {
    store: Store,
    children: Vec<Option<Child>>,
    logs: tempfile::TempDir,
}

impl Cluster {
    fn spawn(test_name: &str, world: usize) -> Self {
        let store = Store::host("127.0.0.1", 0, STORE_TIMEOUT).expect("host the test store");
        let logs = tempfile::tempdir().expect("log dir");
        let exe = std::env::current_exe().expect("test binary path");
        let children = (0..world)
            .map(|rank| {
                let log = |kind: &str| {
                    std::fs::File::create(logs.path().join(format!("rank{rank}.{kind}")))
                        .expect("create child log")
                };
                let child = Command::new(&exe)
                    .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
                    .env(ENV_RANK, rank.to_string())
                    .env(ENV_WORLD, world.to_string())
                    .env(ENV_STORE_PORT, store.port().to_string())
                    .stdin(Stdio::null())
                    .stdout(log("out"))
                    .stderr(log("err"))
                    .spawn()
                    .expect("spawn a rank");
                Some(child)
            })
            .collect();
        Self {
            store,
            children,
            logs,
        }
    }

    fn log(&self, rank: usize) -> String {
        let read = |kind: &str| {
            std::fs::read_to_string(self.logs.path().join(format!("rank{rank}.{kind}")))
                .unwrap_or_default()
        };
        format!(
            "--- rank {rank} stdout ---\n{}\n--- rank {rank} stderr ---\n{}",
            read("out"),
            read("err")
        )
    }

    fn pid(&self, rank: usize) -> u32 {
        self.children[rank].as_ref().expect("rank still owned").id()
    }

    /// Waits for `rank` to exit, killing everything and failing the test past `deadline`.
    fn wait(&mut self, rank: usize, deadline: Instant) -> ExitStatus {
        let mut child = self.children[rank].take().expect("rank waited once");
        loop {
            if let Some(status) = child.try_wait().expect("poll child") {
                return status;
            }
            if Instant::now() > deadline {
                // Best effort: the child may have exited between the poll and the kill.
                let _ = child.kill();
                let _ = child.wait();
                panic!("rank {rank} did not finish in time\n{}", self.log(rank));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn expect_success(&mut self, rank: usize, deadline: Instant) {
        let status = self.wait(rank, deadline);
        assert!(
            status.success(),
            "rank {rank} failed: {status}\n{}",
            self.log(rank)
        );
        // libtest prints "test NAME ... " without a newline before the test's own output.
        for line in self.log(rank).lines() {
            if let Some(at) = line.find("measured:") {
                println!("rank {rank} {}", &line[at..]);
            }
        }
    }

    fn expect_all_succeed(mut self) {
        let deadline = Instant::now() + TEST_DEADLINE;
        for rank in 0..self.children.len() {
            self.expect_success(rank, deadline);
        }
    }

    fn signal(&self, rank: usize, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid(rank).to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} rank {rank}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut child in self.children.iter_mut().filter_map(Option::take) {
            // Cleanup of a failed test: the child may already be gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

// ---------------------------------------------------------------------------------------------
// Correctness of allreduce, broadcast and barrier.

fn check_collectives(me: &Me) {
    let store = me.store();
    let group = loopback_group(&store, "gen0", me.rank, me.world, Duration::from_secs(20));
    let n = 1000;
    let world = me.world as f64;

    // Rank r contributes (r + 1) * [0, 1, ..., n-1]: the sum is world(world+1)/2 * arange.
    let mut t = Tensor::arange(n, (Kind::Float, Device::Cpu)) * (me.rank as f64 + 1.0);
    group.allreduce_sum(&mut t).expect("allreduce f32");
    let expected = Tensor::arange(n, (Kind::Float, Device::Cpu)) * (world * (world + 1.0) / 2.0);
    assert!(
        t.allclose(&expected, 1e-6, 1e-6, false),
        "allreduce f32 sum wrong"
    );

    let mut ints = Tensor::full([7], me.rank as i64 + 10, (Kind::Int64, Device::Cpu));
    group.allreduce_sum(&mut ints).expect("allreduce i64");
    let want: i64 = (0..me.world as i64).map(|r| r + 10).sum();
    assert_eq!(ints.int64_value(&[6]), want);

    // Every rank ends with the last rank's values.
    let root = me.world - 1;
    let mut b = Tensor::full([3, 5], me.rank as f64, (Kind::Double, Device::Cpu));
    group.broadcast(&mut b, root).expect("broadcast");
    assert!(b.equal(&Tensor::full(
        [3, 5],
        root as f64,
        (Kind::Double, Device::Cpu)
    )));

    // A barrier holds everyone until the slowest rank arrives.
    let start = Instant::now();
    if me.rank == 0 {
        std::thread::sleep(Duration::from_millis(300));
    }
    group.barrier().expect("barrier");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "barrier released before rank 0 came"
    );
    group.destroy().expect("destroy");
}

#[test]
fn allreduce_broadcast_and_barrier_on_two_processes() {
    if let Some(me) = Me::from_env() {
        return check_collectives(&me);
    }
    Cluster::spawn("allreduce_broadcast_and_barrier_on_two_processes", 2).expect_all_succeed();
}

#[test]
fn allreduce_broadcast_and_barrier_on_three_processes() {
    if let Some(me) = Me::from_env() {
        return check_collectives(&me);
    }
    Cluster::spawn("allreduce_broadcast_and_barrier_on_three_processes", 3).expect_all_succeed();
}

// ---------------------------------------------------------------------------------------------
// Failures: a killed peer, a stopped peer, and re-forming the group among the survivors.

/// Ranks 0..2 form a group; rank 2 becomes the victim once the group works; the survivors run an
/// all-reduce that cannot finish, then form generation 1 without the victim.
fn survive_a_lost_peer(me: &Me, timeout: Duration, victim_signal_key: &str) -> (Duration, u128) {
    let store = me.store();
    let group = loopback_group(&store, "gen0", me.rank, me.world, timeout);
    let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    group
        .allreduce_sum(&mut t)
        .expect("the healthy group works");
    group.barrier().expect("barrier");
    if me.rank == 2 {
        store.set("victim_ready", b"1").expect("set");
        // The parent signals this process now; it never returns from here.
        std::thread::sleep(Duration::from_secs(600));
        panic!("the victim was not signalled");
    }
    store
        .get(victim_signal_key)
        .expect("wait for the parent to signal the victim");

    let mut big = Tensor::ones([1 << 16], (Kind::Float, Device::Cpu));
    let start = Instant::now();
    let err = group
        .allreduce_sum(&mut big)
        .expect_err("an all-reduce with a lost peer fails");
    let failed_after = start.elapsed();
    let failed_at_ns = now_unix_ns();
    println!("measured: allreduce failed after {failed_after:?}: {err}");

    let start = Instant::now();
    group.destroy().expect("destroy the broken group");
    println!(
        "measured: destroying the broken group took {:?}",
        start.elapsed()
    );

    let start = Instant::now();
    let survivors = loopback_group(&store, "gen1", me.rank, 2, timeout);
    println!("measured: forming generation 1 took {:?}", start.elapsed());
    let mut t = Tensor::full([5], me.rank as f64 + 1.0, (Kind::Float, Device::Cpu));
    survivors
        .allreduce_sum(&mut t)
        .expect("the survivors' group works");
    assert_eq!(t.double_value(&[4]), 3.0, "1 + 2 from ranks 0 and 1");
    survivors.barrier().expect("barrier among survivors");
    survivors.destroy().expect("destroy");
    (failed_after, failed_at_ns)
}

#[test]
fn a_killed_peer_fails_the_survivors_fast_and_they_regroup() {
    const TIMEOUT: Duration = Duration::from_secs(30);
    if let Some(me) = Me::from_env() {
        let (failed_after, failed_at_ns) = survive_a_lost_peer(&me, TIMEOUT, "victim_killed_ns");
        let store = me.store();
        let killed_ns: u128 = String::from_utf8(store.get("victim_killed_ns").expect("get"))
            .expect("utf8")
            .parse()
            .expect("number");
        let detection_ms = failed_at_ns.saturating_sub(killed_ns) as f64 / 1e6;
        println!("measured: failure noticed {detection_ms:.1} ms after the kill");
        assert!(
            failed_after < TIMEOUT / 6,
            "a dead peer must fail the collective well before the {TIMEOUT:?} timeout, took {failed_after:?}"
        );
        return;
    }
    let mut cluster = Cluster::spawn("a_killed_peer_fails_the_survivors_fast_and_they_regroup", 3);
    cluster
        .store
        .get("victim_ready")
        .expect("the victim gets ready");
    cluster.signal(2, "KILL");
    cluster
        .store
        .set("victim_killed_ns", now_unix_ns().to_string().as_bytes())
        .expect("set");
    let deadline = Instant::now() + TEST_DEADLINE;
    let status = cluster.wait(2, deadline);
    assert_eq!(status.signal(), Some(9), "the victim died of SIGKILL");
    cluster.expect_success(0, deadline);
    cluster.expect_success(1, deadline);
}

#[test]
fn a_stopped_peer_fails_the_survivors_at_the_group_timeout_and_they_regroup() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    if let Some(me) = Me::from_env() {
        let (failed_after, _) = survive_a_lost_peer(&me, TIMEOUT, "victim_stopped");
        assert!(
            failed_after >= TIMEOUT - Duration::from_millis(200),
            "a hung peer is only noticed at the timeout, yet it failed after {failed_after:?}"
        );
        assert!(
            failed_after < TIMEOUT * 4,
            "the collective must fail near the {TIMEOUT:?} timeout, took {failed_after:?}"
        );
        return;
    }
    let mut cluster = Cluster::spawn(
        "a_stopped_peer_fails_the_survivors_at_the_group_timeout_and_they_regroup",
        3,
    );
    cluster
        .store
        .get("victim_ready")
        .expect("the victim gets ready");
    cluster.signal(2, "STOP");
    cluster.store.set("victim_stopped", b"1").expect("set");
    let deadline = Instant::now() + TEST_DEADLINE;
    cluster.expect_success(0, deadline);
    cluster.expect_success(1, deadline);
    // Drop kills the stopped victim (SIGKILL works on a stopped process).
}

// ---------------------------------------------------------------------------------------------
// Data-parallel equivalence: 2 ranks x batch b == 1 process x batch 2b.

const EQ_STEPS: i64 = 12;
const EQ_BATCH_PER_RANK: i64 = 4;
const EQ_IN: i64 = 8;
const EQ_HIDDEN: i64 = 16;
const EQ_OUT: i64 = 4;
/// Small, so the 2-layer MLP spans several buckets and the bucketing is exercised.
const EQ_BUCKET_BYTES: usize = 256;

fn mlp(vs: &nn::VarStore) -> impl Module {
    let root = vs.root();
    nn::seq()
        .add(nn::linear(
            &root / "fc1",
            EQ_IN,
            EQ_HIDDEN,
            Default::default(),
        ))
        .add_fn(|x| x.tanh())
        .add(nn::linear(
            &root / "fc2",
            EQ_HIDDEN,
            EQ_OUT,
            Default::default(),
        ))
}

/// The fixed data set: EQ_STEPS global batches of 2b samples, identical on every process.
fn eq_data() -> (Tensor, Tensor) {
    tch::manual_seed(42);
    let n = EQ_STEPS * 2 * EQ_BATCH_PER_RANK;
    let x = Tensor::randn([n, EQ_IN], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([n, EQ_OUT], (Kind::Float, Device::Cpu));
    (x, y)
}

/// Trains with Adam; `shard(step)` gives the rows this process uses at `step`, and `sync`
/// (data-parallel ranks only) averages gradients between backward and step.
fn train(
    vs: &nn::VarStore,
    model: &impl Module,
    shard: impl Fn(i64) -> (i64, i64),
    mut sync: impl FnMut(),
) {
    let (x, y) = eq_data();
    let mut opt = nn::Adam::default().build(vs, 1e-2).expect("adam");
    for step in 0..EQ_STEPS {
        let (start, len) = shard(step);
        let xb = x.narrow(0, start, len);
        let yb = y.narrow(0, start, len);
        let loss = model.forward(&xb).mse_loss(&yb, tch::Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        sync();
        opt.step();
    }
}

fn max_abs_diff(a: &nn::VarStore, b: &nn::VarStore) -> f64 {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    va.iter()
        .map(|(name, t)| (t - &vb[name]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_with_batch_b_match_one_process_with_batch_2b() {
    if let Some(me) = Me::from_env() {
        let store = me.store();
        let group = loopback_group(&store, "gen0", me.rank, me.world, Duration::from_secs(20));

        // Different initial weights per rank: the broadcast from rank 0 must make them equal.
        tch::manual_seed(100 + me.rank as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = mlp(&vs);
        broadcast_var_store(&group, &vs, &[], 0).expect("broadcast initial weights");
        let mut buckets = GradientBuckets::new(&vs, EQ_BUCKET_BYTES).expect("buckets");
        assert!(
            buckets.bucket_count() > 1,
            "the test must span several buckets"
        );
        let b = EQ_BATCH_PER_RANK;
        let rank = me.rank as i64;
        train(
            &vs,
            &model,
            |step| (step * 2 * b + rank * b, b),
            || buckets.allreduce_mean(&group).expect("gradient all-reduce"),
        );

        // The reference: one process, rank 0's initial weights, the full batch of 2b.
        tch::manual_seed(100);
        let reference = nn::VarStore::new(Device::Cpu);
        let reference_model = mlp(&reference);
        train(
            &reference,
            &reference_model,
            |step| (step * 2 * b, 2 * b),
            || {},
        );

        let diff = max_abs_diff(&vs, &reference);
        println!(
            "measured: max |w_ddp - w_single| = {diff:.3e} after {EQ_STEPS} Adam steps, {} buckets",
            buckets.bucket_count()
        );
        assert!(
            diff < 1e-5,
            "data-parallel weights drifted from the reference: {diff:e}"
        );

        // And the weights really moved, so the comparison is not between two initial states.
        tch::manual_seed(100);
        let initial = nn::VarStore::new(Device::Cpu);
        let _ = mlp(&initial);
        assert!(
            max_abs_diff(&vs, &initial) > 1e-3,
            "training changed the weights"
        );
        group.destroy().expect("destroy");
        return;
    }
    Cluster::spawn("two_ranks_with_batch_b_match_one_process_with_batch_2b", 2)
        .expect_all_succeed();
}

// ---------------------------------------------------------------------------------------------
// The store's host dies: the survivors rendezvous over a new store hosted by one of them.

/// Hosts (on `host_rank`) or joins the store of generation `generation`, publishing its port
/// through the parent's store, which stands in for the coordinator.
fn generation_store(me: &Me, coordinator: &Store, generation: u32, host_rank: usize) -> Store {
    let key = format!("gen{generation}_store_port");
    if me.rank == host_rank {
        let store = Store::host("127.0.0.1", 0, STORE_TIMEOUT).expect("host generation store");
        coordinator
            .set(&key, store.port().to_string().as_bytes())
            .expect("publish the port");
        store
    } else {
        let port: u16 = String::from_utf8(coordinator.get(&key).expect("port"))
            .expect("utf8")
            .parse()
            .expect("port number");
        Store::connect("127.0.0.1", port, STORE_TIMEOUT).expect("join generation store")
    }
}

#[test]
fn survivors_regroup_over_a_new_store_when_the_store_host_dies() {
    const TIMEOUT: Duration = Duration::from_secs(30);
    if let Some(me) = Me::from_env() {
        let coordinator = me.store();
        let store0 = generation_store(&me, &coordinator, 0, 0);
        let group = loopback_group(&store0, "g", me.rank, me.world, TIMEOUT);
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        group.allreduce_sum(&mut t).expect("generation 0 works");
        group.barrier().expect("barrier");
        if me.rank == 0 {
            coordinator.set("victim_ready", b"1").expect("set");
            std::thread::sleep(Duration::from_secs(600));
            panic!("the store host was not killed");
        }
        coordinator.get("victim_killed").expect("wait for the kill");
        let start = Instant::now();
        group
            .allreduce_sum(&mut t)
            .expect_err("the store host is gone");
        assert!(start.elapsed() < TIMEOUT / 6, "a dead peer fails fast");
        drop(group);
        drop(store0);

        // Generation 1: old rank 1 hosts the store and becomes rank 0; old rank 2 becomes rank 1.
        let new_rank = me.rank - 1;
        let store1 = generation_store(&me, &coordinator, 1, 1);
        let group = loopback_group(&store1, "g", new_rank, 2, TIMEOUT);
        let mut t = Tensor::full([3], new_rank as f64 + 1.0, (Kind::Float, Device::Cpu));
        group.allreduce_sum(&mut t).expect("generation 1 works");
        assert_eq!(t.double_value(&[0]), 3.0);
        group.destroy().expect("destroy");
        return;
    }
    let mut cluster = Cluster::spawn(
        "survivors_regroup_over_a_new_store_when_the_store_host_dies",
        3,
    );
    cluster
        .store
        .get("victim_ready")
        .expect("the store host gets ready");
    cluster.signal(0, "KILL");
    cluster.store.set("victim_killed", b"1").expect("set");
    let deadline = Instant::now() + TEST_DEADLINE;
    assert_eq!(cluster.wait(0, deadline).signal(), Some(9));
    cluster.expect_success(1, deadline);
    cluster.expect_success(2, deadline);
}
