//! Fuzzing suite of the control-plane codec (issue 21): every message type, valid and then
//! mutated (bits flipped, bytes overwritten, cut, spliced, huge varints inserted, the length
//! prefix damaged), through `framing::decode` and through `read_message` on a byte stream. No
//! input may panic, a valid message must round-trip, and no single allocation may exceed the
//! decoder's budget (`DECODE_CLAIM_LIMIT`), which a counting global allocator checks.
//!
//! 10^5 cases per target by default; `EQIM_FUZZ_CASES=N` changes it.

use eqim_common::framing::{
    decode, encode, read_message, FrameError, DECODE_CLAIM_LIMIT, MAX_CONTROL_FRAME_BYTES,
};
use eqim_common::proto::{
    AbortReason, Assignment, CheckpointOrder, CoordinatorToWorker, Cursor, EvalPlanInfo,
    Generation, Hello, LeaseId, Refusal, Rendezvous, StoreEndpoint, VoteOutcome, WorkerId,
    WorkerPhase, WorkerToCoordinator, WrittenFile,
};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The system allocator, recording the largest single request.
struct Counting;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the only addition is an atomic counter update.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `alloc` are passed on as they are.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` and `layout` come from this allocator (hence from `System`).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator (hence from `System`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn cases() -> u32 {
    std::env::var("EQIM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Failures are reported with their input; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fn text() -> impl Strategy<Value = String> {
    prop::string::string_regex(".{0,12}").expect("a valid regex")
}

fn generation() -> impl Strategy<Value = Generation> {
    any::<u64>().prop_map(Generation)
}

fn outcome() -> impl Strategy<Value = VoteOutcome> {
    prop_oneof![
        Just(VoteOutcome::Ok),
        text().prop_map(|reason| VoteOutcome::Failed { reason })
    ]
}

fn written_files() -> impl Strategy<Value = Vec<WrittenFile>> {
    prop::collection::vec(
        (text(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(path, bytes, sha256)| WrittenFile {
            path,
            bytes,
            sha256,
        }),
        0..4,
    )
}

fn plan() -> impl Strategy<Value = EvalPlanInfo> {
    (any::<[u64; 4]>(), text()).prop_map(|(n, settings_json)| EvalPlanInfo {
        num_images: n[0],
        class_num: n[1],
        base_seed: n[2],
        batch_size: n[3],
        settings_json,
    })
}

fn hello() -> impl Strategy<Value = WorkerToCoordinator> {
    (
        any::<u32>(),
        text(),
        any::<[u8; 32]>(),
        text(),
        any::<u16>(),
        text(),
    )
        .prop_map(|(protocol_version, id, token_proof, host, port, device)| {
            WorkerToCoordinator::Hello(Hello {
                protocol_version,
                worker_id: WorkerId(id),
                token_proof,
                store: StoreEndpoint { host, port },
                device,
            })
        })
}

fn phase() -> impl Strategy<Value = WorkerPhase> {
    prop_oneof![
        Just(WorkerPhase::Joining),
        Just(WorkerPhase::Syncing),
        Just(WorkerPhase::Training),
        Just(WorkerPhase::Draining),
    ]
}

fn features() -> impl Strategy<Value = WorkerToCoordinator> {
    let rows = prop::collection::vec(any::<f32>(), 0..64);
    (any::<u64>(), any::<u64>(), any::<u32>(), rows).prop_map(|(l, first_index, dim, rows)| {
        WorkerToCoordinator::EvalFeatures {
            lease: LeaseId(l),
            first_index,
            dim,
            rows,
        }
    })
}

/// Every `WorkerToCoordinator` variant.
fn worker_message() -> impl Strategy<Value = WorkerToCoordinator> {
    use WorkerToCoordinator as W;
    prop_oneof![
        hello(),
        (generation(), phase(), any::<u64>()).prop_map(|(generation, phase, step)| {
            W::Heartbeat {
                generation,
                phase,
                step,
            }
        }),
        generation().prop_map(|generation| W::GroupReady { generation }),
        (generation(), any::<u64>(), outcome()).prop_map(|(generation, step, outcome)| {
            W::Vote {
                generation,
                step,
                outcome,
            }
        }),
        any::<u64>().prop_map(|nonce| W::ProbeAck { nonce }),
        (generation(), text()).prop_map(|(generation, reason)| W::Leaving { generation, reason }),
        (generation(), any::<u64>(), written_files()).prop_map(|(generation, step, files)| {
            W::CheckpointWritten {
                generation,
                step,
                files,
            }
        }),
        (plan(), any::<u64>())
            .prop_map(|(plan, max_images)| W::EvalLeaseRequest { plan, max_images }),
        any::<u64>().prop_map(|l| W::EvalLeaseRenew { lease: LeaseId(l) }),
        features(),
        (any::<u64>(), written_files()).prop_map(|(l, files)| W::EvalLeaseComplete {
            lease: LeaseId(l),
            files
        }),
    ]
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        (any::<u32>(), any::<u32>())
            .prop_map(|(expected, got)| Refusal::ProtocolVersion { expected, got }),
        Just(Refusal::BadToken),
        any::<u32>().prop_map(|max_workers| Refusal::JobFull { max_workers }),
        Just(Refusal::JobFinished),
    ]
}

fn abort_reason() -> impl Strategy<Value = AbortReason> {
    prop_oneof![
        (text(), text()).prop_map(|(w, reason)| AbortReason::VoteFailed {
            worker: WorkerId(w),
            reason
        }),
        text().prop_map(|w| AbortReason::MemberLost {
            worker: WorkerId(w)
        }),
        Just(AbortReason::Timeout),
    ]
}

fn welcome() -> impl Strategy<Value = CoordinatorToWorker> {
    let ranks = any::<(u32, u32)>();
    let cursor = any::<(u64, u32, u64)>();
    (generation(), ranks, text(), any::<u16>(), cursor).prop_map(
        |(generation, (rank, world_size), host, port, (step, epoch, offset))| {
            CoordinatorToWorker::Welcome {
                generation,
                rank,
                world_size,
                rendezvous: Rendezvous {
                    store_host: host,
                    store_port: port,
                    prefix: format!("gen{}", generation.0),
                },
                resume: Cursor {
                    step,
                    epoch,
                    offset,
                },
            }
        },
    )
}

fn assign() -> impl Strategy<Value = CoordinatorToWorker> {
    let batches = prop::collection::vec(prop::collection::vec(any::<u64>(), 0..8), 0..4);
    (generation(), any::<(u64, u32, u64)>(), batches).prop_map(
        |(generation, (step, epoch, step_samples), micro_batches)| {
            CoordinatorToWorker::Assign(Assignment {
                generation,
                step,
                epoch,
                micro_batches,
                step_samples,
            })
        },
    )
}

fn lease_grant() -> impl Strategy<Value = CoordinatorToWorker> {
    (
        any::<u64>(),
        any::<(u64, u64)>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(l, (a, b), deadline_ms, want_features)| {
            CoordinatorToWorker::EvalLeaseGrant {
                lease: LeaseId(l),
                indices: a..b,
                deadline_ms,
                want_features,
            }
        })
}

/// Every `CoordinatorToWorker` variant.
fn coordinator_message() -> impl Strategy<Value = CoordinatorToWorker> {
    use CoordinatorToWorker as C;
    let order = (any::<u32>(), text())
        .prop_map(|(writer_rank, name)| CheckpointOrder { writer_rank, name });
    prop_oneof![
        any::<u64>().prop_map(|heartbeat_interval_ms| C::Admitted {
            heartbeat_interval_ms
        }),
        refusal().prop_map(|reason| C::Refused { reason }),
        welcome(),
        assign(),
        (generation(), any::<u64>(), prop::option::of(order)).prop_map(
            |(generation, step, checkpoint)| C::Commit {
                generation,
                step,
                checkpoint
            }
        ),
        (generation(), any::<u64>(), abort_reason()).prop_map(|(generation, step, reason)| {
            C::Abort {
                generation,
                step,
                reason,
            }
        }),
        any::<u64>().prop_map(|nonce| C::Probe { nonce }),
        text().prop_map(|reason| C::Paused { reason }),
        lease_grant(),
        text().prop_map(|reason| C::EvalRefused { reason }),
        Just(C::EvalDone),
        (generation(), any::<u64>(), text()).prop_map(|(generation, steps, name)| {
            C::CheckpointNow {
                generation,
                steps,
                name,
            }
        }),
        text().prop_map(|reason| C::Finished { reason }),
    ]
}

/// One way to damage an encoded frame.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Truncate {
        keep: usize,
    },
    Splice {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A u64 varint marker and value where a length or an integer may have been.
    HugeVarint {
        at: usize,
        value: u64,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
        (any::<usize>(), any::<u64>()).prop_map(|(at, value)| Mutation::HugeVarint { at, value }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
    match m {
        Mutation::FlipBit { at, bit } if !bytes.is_empty() => {
            let i = pos(*at, bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::SetByte { at, value } if !bytes.is_empty() => {
            let i = pos(*at, bytes.len());
            bytes[i] = *value;
        }
        Mutation::Truncate { keep } => bytes.truncate(pos(*keep, bytes.len() + 1)),
        Mutation::Splice { at, bytes: new } => {
            let i = pos(*at, bytes.len() + 1);
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::HugeVarint { at, value } => {
            let i = pos(*at, bytes.len() + 1);
            let mut v = vec![0xFD];
            v.extend_from_slice(&value.to_le_bytes());
            bytes.splice(i..i, v);
        }
        _ => {}
    }
}

/// The payload behind its length prefix, which the mutations may damage too.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

fn check_allocation() -> Result<(), TestCaseError> {
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    prop_assert!(
        largest <= DECODE_CLAIM_LIMIT,
        "an allocation of {largest} bytes exceeds the decoder's budget of {DECODE_CLAIM_LIMIT}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn worker_messages_round_trip_and_mutations_never_panic_or_over_allocate(
        msg in worker_message(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let payload = encode(&msg).expect("a generated message encodes");
        prop_assert!(payload.len() <= MAX_CONTROL_FRAME_BYTES);
        prop_assert_eq!(&decode::<WorkerToCoordinator>(&payload).expect("decodes"), &msg);
        let mut bytes = payload.clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        // A message or an error are both fine; a panic fails the case.
        let _decoded = decode::<WorkerToCoordinator>(&bytes);
        let mut stream = framed(&payload);
        for m in &mutations {
            mutate(&mut stream, m);
        }
        let read = runtime().block_on(read_message::<_, WorkerToCoordinator>(&mut &stream[..]));
        if let Err(FrameError::TooLarge { len, max }) = read {
            prop_assert!(len > max);
        }
        check_allocation()?;
    }

    #[test]
    fn coordinator_messages_round_trip_and_mutations_never_panic_or_over_allocate(
        msg in coordinator_message(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let payload = encode(&msg).expect("a generated message encodes");
        prop_assert_eq!(&decode::<CoordinatorToWorker>(&payload).expect("decodes"), &msg);
        let mut stream = framed(&payload);
        for m in &mutations {
            mutate(&mut stream, m);
        }
        let _decoded = decode::<CoordinatorToWorker>(&stream[4.min(stream.len())..]);
        let _read = runtime().block_on(read_message::<_, CoordinatorToWorker>(&mut &stream[..]));
        check_allocation()?;
    }
}
