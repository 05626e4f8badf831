//! The proxy-wasm ABI v0.2.1 vocabulary: status codes, enum values, and the two wire formats
//! the ABI uses (the header-map "pairs" serialization and the NUL-joined property path).
//!
//! Pure data and parsing; no wasmtime. Everything that parses guest bytes returns an error
//! (never panics) and enforces cpp-host's limits (`include/proxy-wasm/limits.h`).

/// `proxy_status_t` (spec `abi-versions/v0.2.1`).
pub mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const SERIALIZATION_FAILURE: u32 = 3;
    pub const PARSE_FAILURE: u32 = 4;
    pub const INVALID_MEMORY_ACCESS: u32 = 6;
    pub const EMPTY: u32 = 7;
    pub const CAS_MISMATCH: u32 = 8;
    pub const INTERNAL_FAILURE: u32 = 10;
    pub const UNIMPLEMENTED: u32 = 12;
}

/// `proxy_buffer_type_t`.
pub mod buffer {
    pub const HTTP_REQUEST_BODY: u32 = 0;
    pub const HTTP_RESPONSE_BODY: u32 = 1;
    pub const DOWNSTREAM_DATA: u32 = 2;
    pub const UPSTREAM_DATA: u32 = 3;
    pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
    pub const GRPC_RECEIVE_BUFFER: u32 = 5;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
    pub const FOREIGN_FUNCTION_ARGUMENTS: u32 = 8;
}

/// `proxy_map_type_t`.
pub mod map {
    pub const HTTP_REQUEST_HEADERS: u32 = 0;
    pub const HTTP_REQUEST_TRAILERS: u32 = 1;
    pub const HTTP_RESPONSE_HEADERS: u32 = 2;
    pub const HTTP_RESPONSE_TRAILERS: u32 = 3;
    pub const GRPC_INITIAL_METADATA: u32 = 4;
    pub const GRPC_TRAILING_METADATA: u32 = 5;
    pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
    pub const HTTP_CALL_RESPONSE_TRAILERS: u32 = 7;
}

/// `proxy_stream_type_t`.
pub mod stream {
    pub const HTTP_REQUEST: u32 = 0;
    pub const HTTP_RESPONSE: u32 = 1;
    pub const DOWNSTREAM: u32 = 2;
    pub const UPSTREAM: u32 = 3;
}

/// `proxy_action_t`.
pub mod action {
    pub const CONTINUE: i32 = 0;
    pub const PAUSE: i32 = 1;
}

/// `proxy_metric_type_t`.
pub mod metric {
    pub const COUNTER: u32 = 0;
    pub const GAUGE: u32 = 1;
    pub const HISTOGRAM: u32 = 2;
}

/// WASI preview1 errno values the host returns.
pub mod errno {
    pub const SUCCESS: u32 = 0;
    pub const BADF: u32 = 8;
    pub const FAULT: u32 = 21;
    pub const INVAL: u32 = 28;
    pub const NOENT: u32 = 44;
    pub const NOSYS: u32 = 52;
    pub const NOTSUP: u32 = 58;
}

/// cpp-host's limit on one serialized map (1 MiB) and on its pair count.
pub const MAX_MAP_BYTES: usize = 1 << 20;
pub const MAX_MAP_PAIRS: usize = 1024;
/// cpp-host's cap on one `random_get`.
pub const MAX_RANDOM_BYTES: usize = 64 * 1024;

/// The ABI versions a module can declare, from its `proxy_abi_version_*` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }
}

/// Decoded `(key, value)` pairs, in order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Why a guest's serialized map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    #[error("serialized map is truncated (needs {needed} bytes, has {have})")]
    Truncated { needed: usize, have: usize },
    #[error("serialized map has {0} pairs, more than the limit of {MAX_MAP_PAIRS}")]
    TooManyPairs(usize),
    #[error("serialized map is {0} bytes, more than the limit of {MAX_MAP_BYTES}")]
    TooLarge(usize),
    #[error("serialized map entry {0} is not NUL-terminated")]
    MissingNul(usize),
}

/// Decodes `u32 N | N × (u32 klen, u32 vlen) | N × (key 0x00 value 0x00)`.
///
/// An empty buffer, a single `0x00` and `N = 0` all mean "empty map" (the SDK sends `N = 0`).
pub fn decode_pairs(bytes: &[u8]) -> Result<Pairs, PairsError> {
    if bytes.len() > MAX_MAP_BYTES {
        return Err(PairsError::TooLarge(bytes.len()));
    }
    if bytes.len() <= 1 {
        return Ok(Vec::new());
    }
    let n = read_u32(bytes, 0)? as usize;
    if n > MAX_MAP_PAIRS {
        return Err(PairsError::TooManyPairs(n));
    }
    let header = 4 + n * 8;
    if bytes.len() < header {
        return Err(PairsError::Truncated {
            needed: header,
            have: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut pos = header;
    for i in 0..n {
        let klen = read_u32(bytes, 4 + i * 8)? as usize;
        let vlen = read_u32(bytes, 8 + i * 8)? as usize;
        let key = take_nul_terminated(bytes, &mut pos, klen, i)?;
        let value = take_nul_terminated(bytes, &mut pos, vlen, i)?;
        out.push((key.to_vec(), value.to_vec()));
    }
    Ok(out)
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, PairsError> {
    let slice = bytes
        .get(at..at.saturating_add(4))
        .ok_or(PairsError::Truncated {
            needed: at.saturating_add(4),
            have: bytes.len(),
        })?;
    let mut word = [0u8; 4];
    word.copy_from_slice(slice);
    Ok(u32::from_le_bytes(word))
}

fn take_nul_terminated<'a>(
    bytes: &'a [u8],
    pos: &mut usize,
    len: usize,
    entry: usize,
) -> Result<&'a [u8], PairsError> {
    let end = pos.saturating_add(len);
    let data = bytes.get(*pos..end).ok_or(PairsError::Truncated {
        needed: end.saturating_add(1),
        have: bytes.len(),
    })?;
    if bytes.get(end) != Some(&0) {
        return Err(PairsError::MissingNul(entry));
    }
    *pos = end + 1;
    Ok(data)
}

/// Encodes pairs in the format [`decode_pairs`] reads (always with the `N` header, as Envoy).
pub fn encode_pairs<'a, I, K, V>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a K, &'a V)> + Clone,
    K: AsRef<[u8]> + ?Sized + 'a,
    V: AsRef<[u8]> + ?Sized + 'a,
{
    let mut n = 0usize;
    let mut data_len = 0usize;
    for (k, v) in pairs.clone() {
        n += 1;
        data_len += k.as_ref().len() + v.as_ref().len() + 2;
    }
    let mut out = Vec::with_capacity(4 + n * 8 + data_len);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Splits a property path: segments are joined with NUL; a trailing NUL is tolerated (Envoy).
pub fn split_property_path(path: &[u8]) -> Vec<&[u8]> {
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|b| *b == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust SDK's own test vector (`SERIALIZED_MAP` in `src/hostcalls.rs`).
    const SDK_MAP: &[u8] = &[
        4, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 10, 0, 0, 0, 11, 0, 0, 0, 10,
        0, 0, 0, 10, 0, 0, 0, b':', b'm', b'e', b't', b'h', b'o', b'd', 0, b'G', b'E', b'T', 0,
        b':', b'p', b'a', b't', b'h', 0, b'/', b'b', b'y', b't', b'e', b's', b'/', b'1', 0, b':',
        b'a', b'u', b't', b'h', b'o', b'r', b'i', b't', b'y', 0, b'h', b't', b't', b'p', b'b',
        b'i', b'n', b'.', b'o', b'r', b'g', 0, b'P', b'o', b'w', b'e', b'r', b'e', b'd', b'-',
        b'B', b'y', 0, b'p', b'r', b'o', b'x', b'y', b'-', b'w', b'a', b's', b'm', 0,
    ];

    #[test]
    fn sdk_test_vector_round_trips() {
        let pairs = decode_pairs(SDK_MAP).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[0], (b":method".to_vec(), b"GET".to_vec()));
        assert_eq!(pairs[3], (b"Powered-By".to_vec(), b"proxy-wasm".to_vec()));
        let encoded = encode_pairs(pairs.iter().map(|(k, v)| (k, v)));
        assert_eq!(encoded, SDK_MAP);
    }

    #[test]
    fn empty_maps_in_all_three_spellings() {
        assert!(decode_pairs(&[]).unwrap().is_empty());
        assert!(decode_pairs(&[0]).unwrap().is_empty());
        assert!(decode_pairs(&[0, 0, 0, 0]).unwrap().is_empty());
    }

    #[test]
    fn malformed_maps_are_errors_not_panics() {
        assert!(matches!(
            decode_pairs(&[1, 0, 0, 0]),
            Err(PairsError::Truncated { .. })
        ));
        assert!(matches!(
            decode_pairs(&[0xff, 0xff, 0xff, 0xff, 0]),
            Err(PairsError::TooManyPairs(_))
        ));
        // key length points past the end
        let bad = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, b'a', 0, 0];
        assert!(decode_pairs(&bad).is_err());
        // missing NUL
        let bad = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, b'a', b'x', b'b', 0];
        assert_eq!(decode_pairs(&bad), Err(PairsError::MissingNul(0)));
        // every truncation of a valid map is rejected or decodes, never panics
        for cut in 0..SDK_MAP.len() {
            let _ = decode_pairs(&SDK_MAP[..cut]);
        }
    }

    #[test]
    fn property_paths() {
        assert_eq!(
            split_property_path(b"request\0path"),
            vec![&b"request"[..], &b"path"[..]]
        );
        assert_eq!(
            split_property_path(b"source\0identity\0"),
            vec![&b"source"[..], &b"identity"[..]]
        );
        assert!(split_property_path(b"").is_empty());
    }
}
