//! The one place where control messages become bytes: a u32 big-endian length, then a bincode 2
//! payload (serde, standard config). The length is checked against the limit before anything is
//! allocated, and the decoder itself runs under the same limit, so a hostile length prefix inside
//! the payload cannot make us allocate either.
//!
//! Generic over tokio's `AsyncRead`/`AsyncWrite`, so it frames quinn streams and in-memory pipes
//! alike.
//!
//! One limit, [`MAX_CONTROL_FRAME_BYTES`], governs both directions: every payload that
//! [`encode`] accepts, [`decode`] accepts too (see [`DECODE_CLAIM_LIMIT`] for why the decoder's
//! own limit is a multiple of it).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control frame, in bytes (payload, without the 4-byte length). Control messages are
/// small (the largest is a step assignment, about 10 bytes per sample index); bulk transfers use
/// their own streams.
pub const MAX_CONTROL_FRAME_BYTES: usize = 1 << 20;

/// Largest `Hello` frame the coordinator reads before a peer is authenticated: a worker id, a
/// host name and a device string, far below this.
pub const MAX_HELLO_FRAME_BYTES: usize = 4 << 10;

/// How long the rest of a frame may take once its first byte arrived. Waiting for a frame to
/// start is unbounded (an idle control stream is normal; liveness is the heartbeats' job), but a
/// peer that starts a frame and stalls would otherwise hold its buffer forever.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// The decoder's allocation budget per frame. bincode charges every decoded integer its in-memory
/// size (8 bytes for a u64 or a length, 4 for an enum tag) however few bytes its varint took, so
/// a payload of n bytes can claim up to 8n. With this limit every payload of at most
/// [`MAX_CONTROL_FRAME_BYTES`] decodes, and a hostile length prefix still cannot make the decoder
/// allocate more than 8 MiB (lazily zeroed pages, never filled beyond the payload).
pub const DECODE_CLAIM_LIMIT: usize = 8 * MAX_CONTROL_FRAME_BYTES;

/// Payload bytes read into memory before more are known to arrive: a peer that announces a large
/// frame and sends little costs us what it sent, not what it announced.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Why a frame could not be read, written, encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("control stream ended in the middle of a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    #[error("control stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode control message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode control message (different eqim version or corrupt frame): {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("control frame has {extra} bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("control frame stalled: {got} of {expected} bytes after {timeout:?}")]
    Stalled {
        expected: usize,
        got: usize,
        timeout: Duration,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_CLAIM_LIMIT>()
}

/// Encodes a message into a frame payload (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = bincode::serde::encode_to_vec(msg, bincode_config())?;
    if bytes.len() > MAX_CONTROL_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_CONTROL_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes a whole frame payload; bytes left over are an error, not ignored.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, bincode_config())?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// Writes one frame: the big-endian u32 length, then the payload.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.len() > MAX_CONTROL_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_CONTROL_FRAME_BYTES,
        });
    }
    let len = u32::try_from(payload.len()).expect("MAX_CONTROL_FRAME_BYTES fits in u32");
    // One write per frame, so a small message leaves in one packet rather than two.
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` is a clean close: the stream ended exactly at a frame boundary.
/// An end inside the length or the payload is [`FrameError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_with(reader, FrameLimits::default()).await
}

/// Size and time bounds of one frame read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest payload accepted; at most [`MAX_CONTROL_FRAME_BYTES`].
    pub max_bytes: usize,
    /// Time allowed from a frame's first byte to its last; `None` waits forever.
    pub frame_timeout: Option<Duration>,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_CONTROL_FRAME_BYTES,
            frame_timeout: None,
        }
    }
}

impl FrameLimits {
    /// A peer's control stream after authentication: the full size, [`DEFAULT_FRAME_TIMEOUT`].
    pub fn authenticated() -> Self {
        Self {
            max_bytes: MAX_CONTROL_FRAME_BYTES,
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
        }
    }

    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.min(MAX_CONTROL_FRAME_BYTES);
        self
    }

    pub fn with_frame_timeout(mut self, frame_timeout: Duration) -> Self {
        self.frame_timeout = Some(frame_timeout);
        self
    }
}

/// [`read_frame`] under `limits`: a length above `limits.max_bytes` is refused before anything
/// is allocated, and once the first byte is in, the rest must come within the frame timeout
/// ([`FrameError::Stalled`]).
pub async fn read_frame_with<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: FrameLimits,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_bytes = [0u8; 4];
    // The wait for a frame to begin is not bounded; only the frame itself is.
    let first = reader.read(&mut len_bytes).await?;
    if first == 0 {
        return Ok(None);
    }
    let mut progress = FrameProgress {
        expected: 4,
        got: first,
    };
    let rest = read_rest(reader, &mut len_bytes, limits.max_bytes, &mut progress);
    let Some(timeout) = limits.frame_timeout else {
        return rest.await.map(Some);
    };
    let timed = tokio::time::timeout(timeout, rest).await;
    match timed {
        Ok(result) => result.map(Some),
        Err(_) => Err(FrameError::Stalled {
            expected: progress.expected,
            got: progress.got,
            timeout,
        }),
    }
}

/// How far a frame read got, kept outside the future so a timeout can report it.
struct FrameProgress {
    expected: usize,
    got: usize,
}

/// Reads the rest of the length (its first `progress.got` bytes are in `len_bytes`) and the
/// payload, growing the buffer only as bytes arrive.
async fn read_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    len_bytes: &mut [u8; 4],
    max_bytes: usize,
    progress: &mut FrameProgress,
) -> Result<Vec<u8>, FrameError> {
    let got = progress.got + read_until_eof(reader, &mut len_bytes[progress.got..]).await?;
    if got < len_bytes.len() {
        return Err(FrameError::Truncated { expected: 4, got });
    }
    let len = u32::from_be_bytes(*len_bytes) as usize;
    if len > max_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_bytes,
        });
    }
    *progress = FrameProgress {
        expected: len,
        got: 0,
    };
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK_BYTES));
    while payload.len() < len {
        let start = payload.len();
        let end = len.min(start + READ_CHUNK_BYTES);
        payload.resize(end, 0);
        let n = reader.read(&mut payload[start..end]).await?;
        payload.truncate(start + n);
        progress.got = payload.len();
        if n == 0 {
            return Err(FrameError::Truncated {
                expected: len,
                got: payload.len(),
            });
        }
    }
    Ok(payload)
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
async fn read_until_eof<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Encodes and writes one message.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    write_frame(writer, &encode(msg)?).await
}

/// Reads and decodes one message; `Ok(None)` on a clean close.
pub async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<T>, FrameError> {
    read_message_with(reader, FrameLimits::default()).await
}

/// [`read_message`] under `limits` (size and per-frame deadline).
pub async fn read_message_with<R: AsyncRead + Unpin, T: DeserializeOwned>(
    reader: &mut R,
    limits: FrameLimits,
) -> Result<Option<T>, FrameError> {
    match read_frame_with(reader, limits).await? {
        Some(payload) => Ok(Some(decode(&payload)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        Assignment, CoordinatorToWorker, Generation, Hello, StoreEndpoint, WorkerId,
        WorkerToCoordinator, PROTOCOL_VERSION,
    };

    fn hello() -> WorkerToCoordinator {
        WorkerToCoordinator::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            worker_id: WorkerId::from("w1"),
            token_proof: [7; 32],
            store: StoreEndpoint {
                host: "10.0.0.1".into(),
                port: 29500,
            },
            device: "cpu".into(),
        })
    }

    #[tokio::test]
    async fn messages_round_trip_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let assign = CoordinatorToWorker::Assign(Assignment {
            generation: Generation(3),
            step: 12,
            epoch: 1,
            micro_batches: vec![vec![5, 9, 1_000_000], vec![]],
            step_samples: 6,
        });
        let sent = assign.clone();
        let writer = tokio::spawn(async move {
            write_message(&mut a, &hello()).await.unwrap();
            write_message(&mut a, &sent).await.unwrap();
        });
        let first: WorkerToCoordinator = read_message(&mut b).await.unwrap().unwrap();
        let second: CoordinatorToWorker = read_message(&mut b).await.unwrap().unwrap();
        writer.await.unwrap();
        assert_eq!(first, hello());
        assert_eq!(second, assign);
        // The writer half is dropped: a clean close at a frame boundary.
        assert!(read_frame(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let mut bytes: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let err = read_frame(&mut bytes).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == u32::MAX as usize && max == MAX_CONTROL_FRAME_BYTES),
            "{err}"
        );
        let mut sink = Vec::new();
        let big = vec![0u8; MAX_CONTROL_FRAME_BYTES + 1];
        assert!(matches!(
            write_frame(&mut sink, &big).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(sink.is_empty(), "nothing is written for an oversized frame");
    }

    #[tokio::test]
    async fn end_inside_a_frame_is_truncated_not_a_clean_close() {
        let payload = encode(&hello()).unwrap();
        let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&payload);
        let cut = &framed[..framed.len() - 3];
        let err = read_frame(&mut &cut[..]).await.unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { expected, got } if expected == payload.len() && got == payload.len() - 3),
            "{err}"
        );
        let err = read_frame(&mut &framed[..2]).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
        assert!(read_frame(&mut &[][..]).await.unwrap().is_none());
    }

    #[test]
    fn garbage_and_trailing_bytes_do_not_decode() {
        let mut payload = encode(&hello()).unwrap();
        payload.push(0);
        assert!(matches!(
            decode::<WorkerToCoordinator>(&payload),
            Err(FrameError::TrailingBytes { extra: 1 })
        ));
        // A variant index far out of range.
        assert!(matches!(
            decode::<WorkerToCoordinator>(&[0xFB, 0xFF, 0xFF, 0xFF, 0x7F]),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn a_length_prefix_inside_the_payload_cannot_force_a_huge_allocation() {
        // `Assign` with a micro_batches vector claiming 2^40 elements.
        let mut payload = encode(&CoordinatorToWorker::EvalDone).unwrap();
        payload.clear();
        payload.push(3); // variant index of Assign
        payload.extend_from_slice(&[1, 1, 1]); // generation, step, epoch
        payload.push(0xFD); // u64 varint marker
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            decode::<CoordinatorToWorker>(&payload),
            Err(FrameError::Decode(_))
        ));
    }

    /// A `Vote` whose encoding is exactly `target` bytes (the reason string fills it up).
    fn vote_of_encoded_len(target: usize) -> WorkerToCoordinator {
        use crate::proto::VoteOutcome;
        let vote = |n: usize| WorkerToCoordinator::Vote {
            generation: Generation(u64::MAX),
            step: u64::MAX,
            outcome: VoteOutcome::Failed {
                reason: "x".repeat(n),
            },
        };
        let raw_len = |msg: &WorkerToCoordinator| {
            bincode::serde::encode_to_vec(msg, bincode::config::standard())
                .unwrap()
                .len()
        };
        let overhead = raw_len(&vote(target)) - target;
        let msg = vote(target - overhead);
        // The string's varint length may shrink at the boundary; top the string up.
        let short = target - raw_len(&msg);
        let msg = vote(target - overhead + short);
        assert_eq!(raw_len(&msg), target);
        msg
    }

    #[tokio::test]
    async fn the_largest_frame_that_encodes_also_decodes() {
        let largest = vote_of_encoded_len(MAX_CONTROL_FRAME_BYTES);
        let payload = encode(&largest).unwrap();
        assert_eq!(payload.len(), MAX_CONTROL_FRAME_BYTES);
        let mut wire = Vec::new();
        write_frame(&mut wire, &payload).await.unwrap();
        let back: WorkerToCoordinator = read_message(&mut &wire[..]).await.unwrap().unwrap();
        assert_eq!(back, largest);
        // One byte more is refused at encoding, so it never reaches a peer.
        let over = vote_of_encoded_len(MAX_CONTROL_FRAME_BYTES + 1);
        assert!(matches!(
            encode(&over),
            Err(FrameError::TooLarge { len, max }) if len == MAX_CONTROL_FRAME_BYTES + 1 && max == MAX_CONTROL_FRAME_BYTES
        ));
    }

    #[test]
    fn a_frame_of_one_byte_integers_decodes_although_bincode_charges_eight_per_integer() {
        // Sample indices below 251 take one varint byte but count 8 bytes in the decode limit.
        let n = MAX_CONTROL_FRAME_BYTES - 64;
        let assign = CoordinatorToWorker::Assign(Assignment {
            generation: Generation(1),
            step: 1,
            epoch: 0,
            micro_batches: vec![vec![7; n]],
            step_samples: n as u64,
        });
        let payload = encode(&assign).unwrap();
        assert!(payload.len() <= MAX_CONTROL_FRAME_BYTES);
        assert_eq!(decode::<CoordinatorToWorker>(&payload).unwrap(), assign);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_stalled_half_way_is_dropped_after_the_frame_timeout() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let payload = encode(&hello()).unwrap();
        let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&payload[..payload.len() / 2]);
        a.write_all(&framed).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = read_message_with::<_, WorkerToCoordinator>(&mut b, FrameLimits::authenticated())
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::Stalled { expected, got, timeout }
                if expected == payload.len() && got == payload.len() / 2 && timeout == DEFAULT_FRAME_TIMEOUT),
            "{err}"
        );
        assert_eq!(started.elapsed(), DEFAULT_FRAME_TIMEOUT);
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_is_not_a_stalled_frame() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let reader = tokio::spawn(async move {
            read_message_with::<_, WorkerToCoordinator>(&mut b, FrameLimits::authenticated()).await
        });
        // Ten frame timeouts of silence, then a whole frame: it is read, not timed out.
        tokio::time::sleep(DEFAULT_FRAME_TIMEOUT * 10).await;
        write_message(&mut a, &hello()).await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), Some(hello()));
    }

    #[tokio::test]
    async fn a_hello_limit_refuses_larger_frames_before_reading_them() {
        let limits = FrameLimits::default().with_max_bytes(MAX_HELLO_FRAME_BYTES);
        let mut bytes: &[u8] = &[0, 0, 0x10, 0x01];
        assert!(matches!(
            read_frame_with(&mut bytes, limits).await,
            Err(FrameError::TooLarge { len: 0x1001, max }) if max == MAX_HELLO_FRAME_BYTES
        ));
    }
}
