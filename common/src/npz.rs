//! A minimal NumPy `.npy`/`.npz` reader and writer for f64 arrays: enough for FID statistics
//! files (`mu`, `sigma`) as written by `np.savez` / `np.savez_compressed` and read by `np.load`.
//! Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// A dense little-endian array of f64 in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{what}: not a .npy array ({reason})")]
    Format { what: String, reason: String },
    #[error(
        "{what}: dtype {descr} is not supported (expected little-endian float: '<f8' or '<f4')"
    )]
    Dtype { what: String, descr: String },
    #[error("{path}: not a readable .npz archive: {source}")]
    Zip {
        path: String,
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

const MAGIC: &[u8] = b"\x93NUMPY";

impl NpyArray {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "npy: shape does not match the data length"
        );
        Self { shape, data }
    }

    /// Serializes as a version 1.0 `.npy` with dtype `<f8`, C order.
    pub fn to_npy_bytes(&self) -> Vec<u8> {
        let mut out = npy_header("<f8", &self.shape);
        out.reserve(self.data.len() * 8);
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses a `.npy` (versions 1-3) holding `<f8` or `<f4` data, C or Fortran order.
    pub fn from_npy_bytes(bytes: &[u8], what: &str) -> Result<Self, NpyError> {
        let bad = |reason: &str| NpyError::Format {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err(bad("missing the \\x93NUMPY magic"));
        }
        let (header_len, header_start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 if bytes.len() >= 12 => (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            ),
            v => return Err(bad(&format!("unsupported format version {v}"))),
        };
        let header = bytes
            .get(header_start..header_start + header_len)
            .ok_or_else(|| bad("truncated header"))?;
        let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
        let descr = header_value(header, "descr")
            .ok_or_else(|| bad("header has no 'descr'"))?
            .trim_matches(|c| c == '\'' || c == '"')
            .to_string();
        let fortran = header_value(header, "fortran_order")
            .ok_or_else(|| bad("header has no 'fortran_order'"))?
            .starts_with("True");
        let shape_text =
            header_value(header, "shape").ok_or_else(|| bad("header has no 'shape'"))?;
        let shape = shape_text
            .trim_start_matches('(')
            .split(')')
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().map_err(|_| bad("shape is not integers")))
            .collect::<Result<Vec<_>, _>>()?;
        let count: usize = shape.iter().product();
        let body = &bytes[header_start + header_len..];
        let data: Vec<f64> = match descr.as_str() {
            "<f8" => body
                .get(..count * 8)
                .ok_or_else(|| bad("data shorter than its shape"))?
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            "<f4" => body
                .get(..count * 4)
                .ok_or_else(|| bad("data shorter than its shape"))?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("chunk of 4")) as f64)
                .collect(),
            _ => {
                return Err(NpyError::Dtype {
                    what: what.to_string(),
                    descr,
                })
            }
        };
        let data = if fortran && shape.len() == 2 {
            let (rows, cols) = (shape[0], shape[1]);
            let mut c_order = vec![0.0; count];
            for r in 0..rows {
                for c in 0..cols {
                    c_order[r * cols + c] = data[c * rows + r];
                }
            }
            c_order
        } else if fortran && shape.len() > 2 {
            return Err(bad("Fortran order is supported only up to 2 dimensions"));
        } else {
            data
        };
        Ok(Self { shape, data })
    }
}

/// A version 1.0 `.npy` header for C-order data of dtype `descr` (`<f8`, `|u1`, ...).
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy aligns the data to 64 bytes: magic(6) + version(2) + len(2) + header + '\n'.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let header_len = u16::try_from(header.len()).expect("npy: header fits in u16");
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// The raw text of `key`'s value in a numpy header dict (up to the next top-level comma).
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0usize;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

/// Reads every array of an `.npz` (stored or deflated members named `<key>.npy`).
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, NpyError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| NpyError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|source| NpyError::Zip {
        path: shown.clone(),
        source,
    })?;
    let mut arrays = BTreeMap::new();
    for i in 0..archive.len() {
        let mut member = archive.by_index(i).map_err(|source| NpyError::Zip {
            path: shown.clone(),
            source,
        })?;
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|source| NpyError::Io {
                path: format!("{shown}:{name}"),
                source,
            })?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let array = NpyArray::from_npy_bytes(&bytes, &format!("{shown}:{name}"))?;
        arrays.insert(key, array);
    }
    Ok(arrays)
}

/// Writes arrays as an uncompressed `.npz` atomically (temp file, fsync, rename).
pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> Result<(), NpyError> {
    write_npz_with(path, |zip, options, zip_err| {
        for (key, array) in arrays {
            zip.start_file(format!("{key}.npy"), options)
                .map_err(zip_err)?;
            zip.write_all(&array.to_npy_bytes())
                .map_err(|e| zip_err(e.into()))?;
        }
        Ok(())
    })
}

/// Writes `count` images of `height` x `width` x 3 bytes as one `uint8` array `key` [N, H, W, 3]
/// (the layout of the reference's and ADM's sample archives, `np.load(path)["arr_0"]`),
/// streaming: `image(i)` is asked for each image in turn and must return H*W*3 bytes.
pub fn write_image_npz(
    path: &Path,
    key: &str,
    count: usize,
    height: usize,
    width: usize,
    mut image: impl FnMut(usize) -> Result<Vec<u8>, NpyError>,
) -> Result<(), NpyError> {
    let shown = path.display().to_string();
    write_npz_with(path, |zip, options, zip_err| {
        zip.start_file(format!("{key}.npy"), options)
            .map_err(zip_err)?;
        zip.write_all(&npy_header("|u1", &[count, height, width, 3]))
            .map_err(|e| zip_err(e.into()))?;
        for i in 0..count {
            let bytes = image(i)?;
            if bytes.len() != height * width * 3 {
                return Err(NpyError::Format {
                    what: format!("{shown}: image {i}"),
                    reason: format!(
                        "{} bytes, expected {height}x{width}x3 = {} (every image of an archive has one size)",
                        bytes.len(),
                        height * width * 3
                    ),
                });
            }
            zip.write_all(&bytes).map_err(|e| zip_err(e.into()))?;
        }
        Ok(())
    })
}

type ZipFile = zip::ZipWriter<std::fs::File>;

/// Creates `path` atomically: members are written by `fill` into a temp file, which is synced
/// and renamed over `path` only when everything succeeded.
fn write_npz_with(
    path: &Path,
    fill: impl FnOnce(
        &mut ZipFile,
        zip::write::FileOptions,
        &dyn Fn(zip::result::ZipError) -> NpyError,
    ) -> Result<(), NpyError>,
) -> Result<(), NpyError> {
    let shown = path.display().to_string();
    let io_err = |source| NpyError::Io {
        path: shown.clone(),
        source,
    };
    let zip_err = |source| NpyError::Zip {
        path: shown.clone(),
        source,
    };
    let tmp = path.with_extension("npz.tmp");
    let file = std::fs::File::create(&tmp).map_err(io_err)?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    let filled = fill(&mut zip, options, &zip_err);
    let finished = filled.and_then(|()| zip.finish().map_err(zip_err));
    let file = match finished {
        Ok(file) => file,
        Err(e) => {
            // Never leave a half-written archive behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    file.sync_all().map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_vectors_and_matrices() {
        let v = NpyArray::new(vec![3], vec![1.0, -2.5, 1e-300]);
        let m = NpyArray::new(vec![2, 3], (0..6).map(|i| i as f64 * 0.5).collect());
        for a in [&v, &m] {
            let bytes = a.to_npy_bytes();
            assert_eq!(
                (bytes.len() - a.data.len() * 8) % 64,
                0,
                "data aligned to 64"
            );
            assert_eq!(&NpyArray::from_npy_bytes(&bytes, "t").expect("parse"), a);
        }
    }

    #[test]
    fn npy_reads_float32_and_fortran_order() {
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        // Column-major [[0,1,2],[3,4,5]] is 0,3,1,4,2,5.
        for v in [0f32, 3.0, 1.0, 4.0, 2.0, 5.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let a = NpyArray::from_npy_bytes(&bytes, "t").expect("parse");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn npy_refuses_other_dtypes_and_garbage() {
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&7i64.to_le_bytes());
        let err = NpyArray::from_npy_bytes(&bytes, "x.npy").expect_err("int dtype");
        assert!(err.to_string().contains("'<f8'"), "{err}");
        assert!(NpyArray::from_npy_bytes(b"PK\x03\x04 not npy", "x").is_err());
    }

    #[test]
    fn npz_round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stats.npz");
        let mu = NpyArray::new(vec![2], vec![0.5, 1.5]);
        let sigma = NpyArray::new(vec![2, 2], vec![1.0, 0.1, 0.1, 2.0]);
        write_npz(&path, &[("mu", &mu), ("sigma", &sigma)]).expect("write");
        let arrays = read_npz(&path).expect("read");
        assert_eq!(arrays.get("mu"), Some(&mu));
        assert_eq!(arrays.get("sigma"), Some(&sigma));
        assert!(!path.with_extension("npz.tmp").exists());
    }

    #[test]
    fn image_npz_holds_uint8_images_in_nhwc_and_refuses_odd_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("samples.npz");
        write_image_npz(&path, "arr_0", 3, 2, 4, |i| {
            Ok(vec![i as u8 * 10; 2 * 4 * 3])
        })
        .expect("write");
        let mut archive =
            zip::ZipArchive::new(std::fs::File::open(&path).expect("open")).expect("zip");
        let mut member = archive.by_name("arr_0.npy").expect("member");
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).expect("read");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("ascii");
        assert!(header.contains("'descr': '|u1'"), "{header}");
        assert!(header.contains("'shape': (3, 2, 4, 3)"), "{header}");
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 3 * 2 * 4 * 3);
        assert_eq!((data[0], data[24], data[48]), (0, 10, 20));
        let bad = dir.path().join("bad.npz");
        let err = write_image_npz(&bad, "arr_0", 2, 2, 2, |_| Ok(vec![0; 5])).expect_err("size");
        assert!(err.to_string().contains("expected 2x2x3"), "{err}");
        assert!(!bad.exists() && !bad.with_extension("npz.tmp").exists());
    }
}
