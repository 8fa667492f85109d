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
        NpyArray::decode(
            &descr,
            shape,
            fortran,
            &bytes[header_start + header_len..],
            what,
        )
    }

    /// An array from raw little-endian data: `descr` `<f8` or `<f4`, C or Fortran order.
    fn decode(
        descr: &str,
        shape: Vec<usize>,
        fortran: bool,
        body: &[u8],
        what: &str,
    ) -> Result<Self, NpyError> {
        let bad = |reason: &str| NpyError::Format {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        let count: usize = shape.iter().product();
        let data: Vec<f64> = match descr {
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
                    descr: descr.to_string(),
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

type Archive = zip::ZipArchive<std::fs::File>;

/// Opens `path` as a zip archive (an `.npz`, or a `torch.save` file).
fn open_archive(path: &Path) -> Result<Archive, NpyError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| NpyError::Io {
        path: shown.clone(),
        source,
    })?;
    zip::ZipArchive::new(file).map_err(|source| NpyError::Zip {
        path: shown,
        source,
    })
}

/// The bytes of member `name` of the archive at `shown`.
fn read_member(archive: &mut Archive, shown: &str, name: &str) -> Result<Vec<u8>, NpyError> {
    let mut member = archive.by_name(name).map_err(|source| NpyError::Zip {
        path: shown.to_owned(),
        source,
    })?;
    let mut bytes = Vec::new();
    member
        .read_to_end(&mut bytes)
        .map_err(|source| NpyError::Io {
            path: format!("{shown}:{name}"),
            source,
        })?;
    Ok(bytes)
}

/// Reads every array of an `.npz` (stored or deflated members named `<key>.npy`).
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, NpyError> {
    let shown = path.display().to_string();
    let mut archive = open_archive(path)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let mut arrays = BTreeMap::new();
    for name in names {
        let bytes = read_member(&mut archive, &shown, &name)?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let array = NpyArray::from_npy_bytes(&bytes, &format!("{shown}:{name}"))?;
        arrays.insert(key, array);
    }
    Ok(arrays)
}

/// Arrays read from a file by name, and every key the file holds (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedArrays {
    pub arrays: BTreeMap<String, NpyArray>,
    pub keys: Vec<String>,
}

/// Reads the arrays `names` (those present) from either an `.npz` (members `<key>.npy`; other
/// members, such as the uint8 image batch `arr_0` of ADM's reference files, are listed but not
/// read) or a `torch.save` archive of a dict of numpy arrays (torch-fidelity's cached statistics,
/// `<name>-inception-v3-compat-stat-fid-2048.pt`: `{"mu": ndarray, "sigma": ndarray}`).
pub fn read_named_arrays(path: &Path, names: &[&str]) -> Result<NamedArrays, NpyError> {
    let shown = path.display().to_string();
    let mut archive = open_archive(path)?;
    let mut members: Vec<String> = archive.file_names().map(str::to_string).collect();
    members.sort();
    // torch.save writes `<archive name>/data.pkl` next to `<archive name>/version`.
    if let Some(pickle) = members.iter().find(|m| m.ends_with("/data.pkl")) {
        let what = format!("{shown}:{pickle}");
        let bytes = read_member(&mut archive, &shown, pickle)?;
        let entries = torch_pickle::dict_of_arrays(&bytes, &what)?;
        let keys = entries.iter().map(|(k, _)| k.clone()).collect();
        let arrays = entries
            .into_iter()
            .filter(|(k, _)| names.contains(&k.as_str()))
            .filter_map(|(k, v)| v.map(|a| (k, a)))
            .collect();
        return Ok(NamedArrays { arrays, keys });
    }
    let keys: Vec<String> = members
        .iter()
        .map(|m| m.strip_suffix(".npy").unwrap_or(m).to_string())
        .collect();
    let mut arrays = BTreeMap::new();
    for (member, key) in members.iter().zip(&keys) {
        if names.contains(&key.as_str()) {
            let bytes = read_member(&mut archive, &shown, member)?;
            let array = NpyArray::from_npy_bytes(&bytes, &format!("{shown}:{member}"))?;
            arrays.insert(key.clone(), array);
        }
    }
    Ok(NamedArrays { arrays, keys })
}

/// Just enough of Python's unpickler for `torch.save({"mu": ndarray, ...})` (pickle protocol 2,
/// which torch.save uses, plus the protocol 4 framing opcodes): numpy arrays arrive as
/// `numpy.core.multiarray._reconstruct(...)` followed by BUILD with (version, shape, dtype,
/// fortran, data), where data is `_codecs.encode(<latin-1 text>, "latin1")`.
/// Opcodes: https://github.com/python/cpython/blob/3.11/Lib/pickletools.py
mod torch_pickle {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::{NpyArray, NpyError};

    #[derive(Debug, Clone)]
    enum Value {
        Mark,
        None,
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(Rc<str>),
        Bytes(Rc<[u8]>),
        Tuple(Rc<[Value]>),
        List(Vec<Value>),
        Dict(Vec<(Value, Value)>),
        Global(Rc<str>),
        /// numpy dtype: its kind ("f8") and, once built, its byte order. Shared (memo and
        /// stack see the same cell) because BUILD completes it in place.
        Dtype(Rc<RefCell<Dtype>>),
        /// ndarray: empty until BUILD gives it its state; shared like `Dtype`.
        Array(Rc<RefCell<Option<NpyArray>>>),
        Object(Rc<str>),
    }

    /// A numpy dtype's kind ("f8") and, once built, its byte order ("<", ">", "|", "=").
    #[derive(Debug, Clone)]
    struct Dtype {
        kind: Rc<str>,
        endian: Option<Rc<str>>,
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        pos: usize,
        what: &'a str,
    }

    impl<'a> Reader<'a> {
        fn bad(&self, reason: impl Into<String>) -> NpyError {
            NpyError::Format {
                what: self.what.to_string(),
                reason: format!("pickle at byte {}: {}", self.pos, reason.into()),
            }
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], NpyError> {
            let out = self
                .bytes
                .get(self.pos..self.pos.saturating_add(n))
                .ok_or_else(|| self.bad("truncated"))?;
            self.pos += n;
            Ok(out)
        }

        fn uint(&mut self, n: usize) -> Result<u64, NpyError> {
            let mut le = [0u8; 8];
            le[..n].copy_from_slice(self.take(n)?);
            Ok(u64::from_le_bytes(le))
        }

        fn line(&mut self) -> Result<&'a str, NpyError> {
            let rest = &self.bytes[self.pos..];
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| self.bad("unterminated line"))?;
            self.pos += end + 1;
            std::str::from_utf8(&rest[..end]).map_err(|_| self.bad("line is not text"))
        }

        fn text(&mut self, n: usize) -> Result<Rc<str>, NpyError> {
            let raw = self.take(n)?;
            std::str::from_utf8(raw)
                .map(Rc::from)
                .map_err(|_| self.bad("string is not UTF-8"))
        }
    }

    /// The top-level dict's entries in order: key, and the array when the value is a float array.
    pub(super) fn dict_of_arrays(
        bytes: &[u8],
        what: &str,
    ) -> Result<Vec<(String, Option<NpyArray>)>, NpyError> {
        let mut r = Reader {
            bytes,
            pos: 0,
            what,
        };
        let top = run(&mut r)?;
        let Value::Dict(entries) = top else {
            return Err(r.bad(format!(
                "the saved object is {}, not a dict of arrays",
                describe(&top)
            )));
        };
        entries
            .into_iter()
            .map(|(k, v)| {
                let Value::Str(key) = k else {
                    return Err(r.bad("a dict key is not a string"));
                };
                let array = match v {
                    Value::Array(a) => a.borrow_mut().take(),
                    _ => None,
                };
                Ok((key.to_string(), array))
            })
            .collect()
    }

    /// A short description of a value for error messages.
    fn describe(v: &Value) -> String {
        match v {
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(x) => format!("the number {x}"),
            Value::Str(s) => format!("the string {:?}", s.chars().take(40).collect::<String>()),
            Value::Object(name) | Value::Global(name) => format!("a {name}"),
            Value::Array(_) => "a single array".into(),
            other => format!("{other:?}").chars().take(60).collect(),
        }
    }

    type Memo = std::collections::HashMap<u64, Value>;

    fn run(r: &mut Reader) -> Result<Value, NpyError> {
        let mut stack: Vec<Value> = Vec::new();
        let mut memo = Memo::default();
        loop {
            let op = r.take(1)?[0];
            match op {
                0x80 => {
                    r.take(1)?; // PROTO n
                }
                0x95 => {
                    r.take(8)?; // FRAME length
                }
                b'.' => return stack.pop().ok_or_else(|| r.bad("STOP on an empty stack")),
                _ => {
                    if let Some(v) = scalar(r, op)? {
                        stack.push(v);
                    } else if !collection_op(r, op, &mut stack)? {
                        object_op(r, op, &mut stack, &mut memo)?;
                    }
                }
            }
        }
    }

    /// Opcodes that push one new value read from the stream (None for other opcodes).
    fn scalar(r: &mut Reader, op: u8) -> Result<Option<Value>, NpyError> {
        let v = match op {
            b'(' => Value::Mark,
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'K' => Value::Int(r.uint(1)? as i64),
            b'M' => Value::Int(r.uint(2)? as i64),
            b'J' => Value::Int(r.uint(4)? as u32 as i32 as i64),
            0x8a => {
                // LONG1: little-endian two's complement of n <= 8 bytes
                let n = r.uint(1)? as usize;
                if n > 8 {
                    return Err(r.bad("integer wider than 64 bits"));
                }
                let raw = r.uint(n)?;
                let shift = 64 - 8 * n as u32;
                let v = if n == 0 {
                    0
                } else {
                    ((raw << shift) as i64) >> shift
                };
                Value::Int(v)
            }
            b'G' => {
                let raw = r.take(8)?;
                Value::Float(f64::from_be_bytes(raw.try_into().expect("8 bytes")))
            }
            b'X' => {
                let n = r.uint(4)? as usize;
                Value::Str(r.text(n)?)
            }
            0x8c => {
                let n = r.uint(1)? as usize;
                Value::Str(r.text(n)?)
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'C' => r.uint(1)?,
                    b'B' => r.uint(4)?,
                    _ => r.uint(8)?,
                } as usize;
                Value::Bytes(Rc::from(r.take(n)?))
            }
            b'}' => Value::Dict(Vec::new()),
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Rc::from(Vec::new())),
            _ => return Ok(None),
        };
        Ok(Some(v))
    }

    /// Opcodes that build tuples, dicts and lists from the stack; false for other opcodes.
    fn collection_op(r: &mut Reader, op: u8, stack: &mut Vec<Value>) -> Result<bool, NpyError> {
        match op {
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let at = stack
                    .len()
                    .checked_sub(n)
                    .ok_or_else(|| r.bad("TUPLEn on a short stack"))?;
                let items: Vec<Value> = stack.split_off(at);
                stack.push(Value::Tuple(Rc::from(items)));
            }
            b't' => {
                let items = pop_to_mark(r, stack)?;
                stack.push(Value::Tuple(Rc::from(items)));
            }
            b's' => {
                let v = pop(r, stack)?;
                let k = pop(r, stack)?;
                match stack.last_mut() {
                    Some(Value::Dict(d)) => d.push((k, v)),
                    _ => return Err(r.bad("SETITEM outside a dict")),
                }
            }
            b'u' => {
                let items = pop_to_mark(r, stack)?;
                let Some(Value::Dict(d)) = stack.last_mut() else {
                    return Err(r.bad("SETITEMS outside a dict"));
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b'a' => {
                let v = pop(r, stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err(r.bad("APPEND outside a list")),
                }
            }
            b'e' => {
                let items = pop_to_mark(r, stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err(r.bad("APPENDS outside a list")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The memo, globals and object construction; every other opcode is refused.
    fn object_op(
        r: &mut Reader,
        op: u8,
        stack: &mut Vec<Value>,
        memo: &mut Memo,
    ) -> Result<(), NpyError> {
        match op {
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.uint(1)?,
                    b'r' => r.uint(4)?,
                    _ => memo.len() as u64,
                };
                let top = stack.last().ok_or_else(|| r.bad("PUT on an empty stack"))?;
                memo.insert(key, top.clone());
            }
            b'h' | b'j' => {
                let key = if op == b'h' { r.uint(1)? } else { r.uint(4)? };
                let v = memo
                    .get(&key)
                    .ok_or_else(|| r.bad("GET of an unset memo"))?;
                stack.push(v.clone());
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(Rc::from(format!("{module}.{name}"))));
            }
            0x93 => {
                let name = pop(r, stack)?;
                let module = pop(r, stack)?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(r.bad("STACK_GLOBAL of non-strings"));
                };
                stack.push(Value::Global(Rc::from(format!("{module}.{name}"))));
            }
            b'R' => {
                let args = pop(r, stack)?;
                let callable = pop(r, stack)?;
                stack.push(reduce(r, callable, args)?);
            }
            0x81 => {
                let _args = pop(r, stack)?;
                let class = pop(r, stack)?;
                stack.push(Value::Object(Rc::from(format!("{class:?}"))));
            }
            b'b' => {
                let state = pop(r, stack)?;
                let target = stack
                    .last()
                    .ok_or_else(|| r.bad("BUILD on an empty stack"))?;
                build(r, target, state)?;
            }
            b'Q' | b'P' => {
                return Err(r.bad(
                    "the file holds torch tensors (persistent storages); only dicts of numpy \
                     arrays (torch-fidelity's cached statistics) are read: save mu and sigma \
                     with np.savez instead",
                ))
            }
            _ => return Err(r.bad(format!("unsupported opcode 0x{op:02x}"))),
        }
        Ok(())
    }

    fn pop(r: &Reader, stack: &mut Vec<Value>) -> Result<Value, NpyError> {
        match stack.pop() {
            Some(Value::Mark) | None => Err(r.bad("pop past a mark or an empty stack")),
            Some(v) => Ok(v),
        }
    }

    fn pop_to_mark(r: &Reader, stack: &mut Vec<Value>) -> Result<Vec<Value>, NpyError> {
        let at = stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| r.bad("no mark on the stack"))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }

    fn reduce(r: &Reader, callable: Value, args: Value) -> Result<Value, NpyError> {
        let (Value::Global(name), Value::Tuple(args)) = (&callable, &args) else {
            return Ok(Value::Object(Rc::from(format!("{callable:?}"))));
        };
        Ok(match (&**name, &args[..]) {
            ("_codecs.encode", [Value::Str(text), Value::Str(encoding)])
                if &**encoding == "latin1" =>
            {
                let bytes = text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| r.bad("latin1 text with a character above 255"))?;
                Value::Bytes(Rc::from(bytes))
            }
            ("numpy.core.multiarray._reconstruct" | "numpy._core.multiarray._reconstruct", _) => {
                Value::Array(Rc::new(RefCell::new(None)))
            }
            ("numpy.dtype", [Value::Str(descr), ..]) => {
                Value::Dtype(Rc::new(RefCell::new(Dtype {
                    kind: descr.clone(),
                    endian: None,
                })))
            }
            ("collections.OrderedDict", _) => Value::Dict(Vec::new()),
            _ => Value::Object(name.clone()),
        })
    }

    /// BUILD: completes a dtype (its byte order) or an ndarray (shape, dtype, order, data) in
    /// place; other objects' state is not needed.
    fn build(r: &Reader, target: &Value, state: Value) -> Result<(), NpyError> {
        let Value::Tuple(state) = state else {
            return Ok(());
        };
        match target {
            // dtype state: (version, endian, subarray, names, fields, elsize, alignment, flags)
            Value::Dtype(dtype) => {
                if let Some(Value::Str(endian)) = state.get(1) {
                    dtype.borrow_mut().endian = Some(endian.clone());
                }
            }
            // ndarray state: (version, shape, dtype, is_fortran, data)
            Value::Array(array) => {
                let [_, Value::Tuple(shape), Value::Dtype(dtype), Value::Bool(fortran), data] =
                    &state[..]
                else {
                    return Err(
                        r.bad("an ndarray's state is not (version, shape, dtype, fortran, data)")
                    );
                };
                let shape = shape
                    .iter()
                    .map(|d| match d {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err(r.bad("an ndarray shape holds a non-integer")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let Value::Bytes(data) = data else {
                    return Err(r.bad("an ndarray's data is not bytes (an object array?)"));
                };
                let Dtype { kind, endian } = dtype.borrow().clone();
                // '|' (byte order not applicable) and '=' (native) are little-endian on every
                // machine torch-fidelity runs on; '>' is refused by `decode`.
                let endian = if endian.as_deref() == Some(">") {
                    ">"
                } else {
                    "<"
                };
                let descr = format!("{endian}{kind}");
                let decoded = NpyArray::decode(&descr, shape, *fortran, data, r.what)?;
                *array.borrow_mut() = Some(decoded);
            }
            _ => {}
        }
        Ok(())
    }
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
    crate::files::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(io_err)?;
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        fill(&mut zip, options, &zip_err)?;
        zip.finish().map_err(zip_err)?;
        Ok(())
    })
}

impl From<crate::files::FileError> for NpyError {
    fn from(e: crate::files::FileError) -> Self {
        NpyError::Io {
            path: e.path.display().to_string(),
            source: e.source,
        }
    }
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

    /// The pickle reader on torch.save archives written by torch-fidelity's caching (fixtures
    /// shared with the worker's FID tests): f8 and f4/Fortran-order copies of the same
    /// statistics read alike, other keys are listed, big-endian arrays are refused.
    #[test]
    fn torch_save_dicts_of_arrays_read_through_the_pickle_reader() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../worker/tests/fixtures/fidelity");
        let read = |name: &str| read_named_arrays(&dir.join(name), &["mu", "sigma"]);
        let f8 = read("small-inception-v3-compat-stat-fid-8.pt").expect("f8 stats");
        let f4 = read("f4-fortran-stat.pt").expect("f4 Fortran stats");
        assert_eq!(f8.keys, vec!["mu", "sigma"]);
        let (mu, sigma) = (&f8.arrays["mu"], &f8.arrays["sigma"]);
        assert_eq!(mu.shape, vec![8]);
        assert_eq!(sigma.shape, vec![8, 8]);
        for key in ["mu", "sigma"] {
            let (a, b) = (&f8.arrays[key], &f4.arrays[key]);
            assert_eq!(a.shape, b.shape, "{key}");
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{key}: {x} vs {y}"
                );
            }
        }
        let other = read("not-stats.pt").expect("other arrays");
        assert_eq!(other.keys, vec!["mean", "cov"]);
        assert!(other.arrays.is_empty());
        let err = read("big-endian-stat.pt")
            .expect_err("big-endian")
            .to_string();
        assert!(err.contains(">f8"), "{err}");
    }
}
