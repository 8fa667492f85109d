//! The one place where control messages become bytes: a u32 big-endian length, then a bincode 2
//! payload (serde, standard config). The length is checked against the limit before anything is
//! allocated, and the decoder itself runs under the same limit, so a hostile length prefix inside
//! the payload cannot make us allocate either.
//!
//! Generic over tokio's `AsyncRead`/`AsyncWrite`, so it frames quinn streams and in-memory pipes
//! alike.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control frame, in bytes (payload, without the 4-byte length). Control messages are
/// small (the largest is a step assignment, about 10 bytes per sample index); bulk transfers use
/// their own streams.
pub const MAX_CONTROL_FRAME_BYTES: usize = 1 << 20;

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
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL_FRAME_BYTES>()
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
    let mut len_bytes = [0u8; 4];
    let got = read_until_eof(reader, &mut len_bytes).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < len_bytes.len() {
        return Err(FrameError::Truncated { expected: 4, got });
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_CONTROL_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_CONTROL_FRAME_BYTES,
        });
    }
    let mut payload = vec![0u8; len];
    let got = read_until_eof(reader, &mut payload).await?;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(Some(payload))
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
    match read_frame(reader).await? {
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
}
