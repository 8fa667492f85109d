//! The latent cache: a dataset encoded once by the tokenizer, both horizontal flips, stored as a
//! safetensors file that any reader can memory-map (`latents` F32 [N, 2, L, C] with flip 0 =
//! original and 1 = mirrored, `labels` I64 [N], `indices` I64 [N] = the dataset index of each
//! row). The generator then trains from it without running the tokenizer, as MAR does.
//! The writer streams rows to disk (the cache can be larger than memory); the reader serves
//! batches by row with positioned reads, which the page cache makes as fast as a mapping.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::loader::{BatchLoader, LoaderConfig, SampleSource};
use super::transform::{SampleRng, STREAM_LATENT_FLIP};
use super::DataError;

pub const LATENTS_KEY: &str = "latents";
pub const LABELS_KEY: &str = "labels";
pub const INDICES_KEY: &str = "indices";
const FORMAT_TAG: &str = "eqim-latent-cache-v1";

fn cache_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::LatentCache {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a finished cache holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatentCacheSummary {
    pub rows: usize,
    pub tokens: usize,
    pub channels: usize,
    pub skipped: Vec<usize>,
}

/// Encodes a dataset (use the eval transform: center crop, no flip) into a cache file.
#[derive(Clone, Debug)]
pub struct LatentCacheWriter {
    batch_size: usize,
    loader: LoaderConfig,
    metadata: BTreeMap<String, String>,
}

impl LatentCacheWriter {
    pub fn new(batch_size: usize) -> Self {
        Self {
            batch_size: batch_size.max(1),
            loader: LoaderConfig::with_seed(0),
            metadata: BTreeMap::new(),
        }
    }

    pub fn with_loader(mut self, loader: LoaderConfig) -> Self {
        self.loader = loader;
        self
    }

    /// A string stored in the safetensors `__metadata__` (for example the tokenizer's hash).
    pub fn with_metadata(mut self, key: &str, value: &str) -> Self {
        self.metadata.insert(key.to_string(), value.to_string());
        self
    }

    /// Encodes every sample of `source` and its mirror image with `encode` (images [B, 3, H, W]
    /// in [-1, 1] to latents [B, L, C]) and writes the cache atomically to `path`.
    pub fn write<F>(
        &self,
        source: Arc<dyn SampleSource>,
        path: &Path,
        encode: F,
    ) -> Result<LatentCacheSummary, DataError>
    where
        F: Fn(&Tensor) -> Tensor,
    {
        let mut summary = None;
        eqim_common::files::write_atomic_with(path, |tmp| -> Result<(), DataError> {
            summary = Some(self.write_temp(source, path, tmp, encode)?);
            Ok(())
        })?;
        let summary = summary.expect("write_atomic_with ran the writer successfully");
        Ok(summary)
    }

    /// Encodes and writes the whole cache to `tmp`, synced to disk.
    fn write_temp<F>(
        &self,
        source: Arc<dyn SampleSource>,
        path: &Path,
        tmp: &Path,
        encode: F,
    ) -> Result<LatentCacheSummary, DataError>
    where
        F: Fn(&Tensor) -> Tensor,
    {
        let capacity = source.len();
        let all: Vec<usize> = (0..capacity).collect();
        let loader = BatchLoader::from_indices(source, &all, self.batch_size, &self.loader);
        let file = File::create(tmp).map_err(io_err(tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut shape: Option<(usize, usize)> = None;
        let mut header_len = 0usize;
        let (mut labels, mut indices, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for batch in loader {
            let batch = batch?;
            skipped.extend_from_slice(&batch.skipped);
            if batch.is_empty() {
                continue;
            }
            let _no_grad = tch::no_grad_guard();
            let plain = encode(&batch.images);
            let mirrored = encode(&batch.images.flip([3]));
            let (l, c) = check_latents(path, &plain, &mirrored, batch.len())?;
            match shape {
                None => {
                    shape = Some((l, c));
                    // Reserve the largest header this cache can need; it is rewritten at the end.
                    header_len = reserved_header_len(capacity, l, c, &self.metadata);
                    out.write_all(&vec![0u8; 8 + header_len])
                        .map_err(io_err(tmp))?;
                }
                Some(s) if s != (l, c) => {
                    return Err(cache_err(
                        path,
                        format!("encode returned [B, {l}, {c}] after [B, {}, {}]", s.0, s.1),
                    ))
                }
                Some(_) => {}
            }
            write_rows(&mut out, plain, mirrored).map_err(io_err(tmp))?;
            labels.extend(
                Vec::<i64>::try_from(&batch.labels).map_err(|e| cache_err(path, e.to_string()))?,
            );
            indices.extend(batch.indices.iter().map(|&i| i as i64));
        }
        let Some((tokens, channels)) = shape else {
            return Err(cache_err(
                path,
                "no readable sample to encode; check the dataset folder",
            ));
        };
        for v in labels.iter().chain(indices.iter()) {
            out.write_all(&v.to_le_bytes()).map_err(io_err(tmp))?;
        }
        let file = out.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
        let header = header_json(labels.len(), tokens, channels, &self.metadata);
        let padded = pad_header(header, header_len);
        file.write_all_at(&(padded.len() as u64).to_le_bytes(), 0)
            .map_err(io_err(tmp))?;
        file.write_all_at(padded.as_bytes(), 8)
            .map_err(io_err(tmp))?;
        file.sync_all().map_err(io_err(tmp))?;
        Ok(LatentCacheSummary {
            rows: labels.len(),
            tokens,
            channels,
            skipped,
        })
    }
}

fn check_latents(
    path: &Path,
    plain: &Tensor,
    mirrored: &Tensor,
    batch: usize,
) -> Result<(usize, usize), DataError> {
    let size = plain.size();
    if size.len() != 3 || size[0] != batch as i64 || mirrored.size() != size {
        return Err(cache_err(
            path,
            format!(
                "encode must map [B, 3, H, W] to [B, L, C] with B = {batch}; got {size:?} and {:?}",
                mirrored.size()
            ),
        ));
    }
    Ok((size[1] as usize, size[2] as usize))
}

fn write_f32s(out: &mut impl Write, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    out.write_all(&bytes)
}

fn header_json(
    rows: usize,
    tokens: usize,
    channels: usize,
    meta: &BTreeMap<String, String>,
) -> String {
    let latent_bytes = rows * 2 * tokens * channels * 4;
    let label_end = latent_bytes + rows * 8;
    let mut metadata = meta.clone();
    metadata.insert("format".into(), FORMAT_TAG.into());
    metadata.insert(
        "flip_axis_1".into(),
        "0=original,1=horizontal mirror".into(),
    );
    json!({
        "__metadata__": metadata,
        LATENTS_KEY: {"dtype": "F32", "shape": [rows, 2, tokens, channels], "data_offsets": [0, latent_bytes]},
        LABELS_KEY: {"dtype": "I64", "shape": [rows], "data_offsets": [latent_bytes, label_end]},
        INDICES_KEY: {"dtype": "I64", "shape": [rows], "data_offsets": [label_end, label_end + rows * 8]},
    })
    .to_string()
}

fn reserved_header_len(
    capacity: usize,
    l: usize,
    c: usize,
    meta: &BTreeMap<String, String>,
) -> usize {
    let longest = header_json(capacity, l, c, meta).len() + 32;
    longest.div_ceil(8) * 8
}

/// safetensors allows trailing spaces in the header; padding keeps the data 8-byte aligned.
fn pad_header(mut header: String, len: usize) -> String {
    while header.len() < len {
        header.push(' ');
    }
    header
}

/// A cache opened for reading.
#[derive(Debug)]
pub struct LatentCache {
    path: PathBuf,
    file: File,
    data_start: u64,
    tokens: usize,
    channels: usize,
    labels: Vec<i64>,
    indices: Vec<i64>,
    metadata: BTreeMap<String, String>,
}

struct Entry {
    dtype: String,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn entry(path: &Path, header: &Value, key: &str) -> Result<Entry, DataError> {
    let e = header
        .get(key)
        .ok_or_else(|| cache_err(path, format!("no tensor '{key}'; rebuild the cache")))?;
    let bad = || {
        cache_err(
            path,
            format!("malformed entry for '{key}'; rebuild the cache"),
        )
    };
    let dtype = e
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_string();
    let nums = |k: &str| -> Result<Vec<usize>, DataError> {
        e.get(k)
            .and_then(Value::as_array)
            .ok_or_else(bad)?
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(bad))
            .collect()
    };
    let shape = nums("shape")?;
    let offsets = nums("data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(bad());
    };
    Ok(Entry {
        dtype,
        shape,
        begin,
        end,
    })
}

impl LatentCache {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(io_err(&path))?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0)
            .map_err(io_err(&path))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
            return Err(cache_err(
                &path,
                "not a safetensors file (bad header length)",
            ));
        }
        let mut header_bytes = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header_bytes, 8)
            .map_err(io_err(&path))?;
        let header: Value = serde_json::from_slice(&header_bytes)
            .map_err(|e| cache_err(&path, format!("header is not JSON: {e}")))?;
        let metadata: BTreeMap<String, String> = header
            .get("__metadata__")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| cache_err(&path, format!("bad __metadata__: {e}")))?
            .unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT_TAG) {
            return Err(cache_err(&path, format!("not an eqim latent cache (format tag {FORMAT_TAG} missing); build it with the latent cache writer")));
        }
        let latents = entry(&path, &header, LATENTS_KEY)?;
        let labels = entry(&path, &header, LABELS_KEY)?;
        let indices = entry(&path, &header, INDICES_KEY)?;
        let data_start = 8 + header_len;
        let (rows, tokens, channels) = match latents.shape[..] {
            [n, 2, l, c] if latents.dtype == "F32" => (n, l, c),
            _ => return Err(cache_err(&path, "latents must be F32 [N, 2, L, C]")),
        };
        let consistent = latents.end - latents.begin == rows * 2 * tokens * channels * 4
            && labels.dtype == "I64"
            && indices.dtype == "I64"
            && labels.shape == [rows]
            && indices.shape == [rows]
            && labels.end - labels.begin == rows * 8
            && indices.end - indices.begin == rows * 8
            && data_start
                + [latents.end, labels.end, indices.end]
                    .into_iter()
                    .max()
                    .unwrap_or(0) as u64
                <= file_len;
        if !consistent {
            return Err(cache_err(&path, "tensor shapes, dtypes or offsets disagree with the file (truncated?); rebuild the cache"));
        }
        let read_i64s = |e: &Entry| -> Result<Vec<i64>, DataError> {
            let mut bytes = vec![0u8; e.end - e.begin];
            file.read_exact_at(&mut bytes, data_start + e.begin as u64)
                .map_err(io_err(&path))?;
            Ok(bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("chunk of 8 bytes")))
                .collect())
        };
        let (labels, indices) = (read_i64s(&labels)?, read_i64s(&indices)?);
        Ok(Self {
            data_start: data_start + latents.begin as u64,
            path,
            file,
            tokens,
            channels,
            labels,
            indices,
            metadata,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// L, the number of tokens per image.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// C, the channels per token.
    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The dataset index each row was encoded from.
    pub fn source_indices(&self) -> &[i64] {
        &self.indices
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads row `row` (flip 0 or 1) into `out` (L*C floats).
    pub fn read_row(&self, row: usize, mirrored: bool, out: &mut [f32]) -> Result<(), DataError> {
        if row >= self.len() {
            return Err(DataError::IndexOutOfRange {
                index: row,
                len: self.len(),
            });
        }
        let per_flip = self.tokens * self.channels;
        assert_eq!(out.len(), per_flip, "latent row buffer size");
        let offset = ((row * 2 + mirrored as usize) * per_flip * 4) as u64;
        let mut bytes = vec![0u8; per_flip * 4];
        self.file
            .read_exact_at(&mut bytes, self.data_start + offset)
            .map_err(io_err(&self.path))?;
        for (dst, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *dst = f32::from_le_bytes(b.try_into().expect("chunk of 4 bytes"));
        }
        Ok(())
    }

    /// Latents [B, L, C] and labels [B] of `rows`, each in the flip given by `mirrored`.
    pub fn batch(&self, rows: &[usize], mirrored: &[bool]) -> Result<(Tensor, Tensor), DataError> {
        assert_eq!(rows.len(), mirrored.len(), "one flip choice per row");
        let per_flip = self.tokens * self.channels;
        let mut values = vec![0f32; rows.len() * per_flip];
        let mut labels = Vec::with_capacity(rows.len());
        for (i, (&row, &flip)) in rows.iter().zip(mirrored).enumerate() {
            self.read_row(row, flip, &mut values[i * per_flip..(i + 1) * per_flip])?;
            labels.push(self.labels[row]);
        }
        let latents = Tensor::from_slice(&values).view([
            rows.len() as i64,
            self.tokens as i64,
            self.channels as i64,
        ]);
        Ok((latents, Tensor::from_slice(&labels)))
    }

    /// A training batch: each row's flip is drawn with p = 0.5 from (epoch seed, row), the
    /// cached counterpart of `RandomHorizontalFlip`.
    pub fn batch_for_seed(&self, rows: &[usize], seed: u64) -> Result<(Tensor, Tensor), DataError> {
        let flips: Vec<bool> = rows
            .iter()
            .map(|&r| SampleRng::new(seed, r as u64, STREAM_LATENT_FLIP).coin())
            .collect();
        self.batch(rows, &flips)
    }
}

/// Appends a batch's rows, [B, 2, L, C] float32: both flips of a sample side by side.
fn write_rows(out: &mut impl Write, plain: Tensor, mirrored: Tensor) -> std::io::Result<()> {
    let rows = Tensor::stack(&[plain, mirrored], 1)
        .to_kind(Kind::Float)
        .to_device(tch::Device::Cpu)
        .contiguous();
    let mut values = vec![0f32; rows.numel()];
    let numel = values.len();
    rows.copy_data(&mut values, numel);
    write_f32s(out, &values)
}
