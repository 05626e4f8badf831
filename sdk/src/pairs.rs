//! The proxy-wasm map serialization:
//! `u32 N | N × (u32 key_len, u32 value_len) | N × (key 0x00 value 0x00)`, little-endian.

/// Decoded `(key, value)` pairs.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Encodes pairs (always with the `N` header).
pub fn encode_pairs<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    I::IntoIter: Clone,
{
    let pairs = pairs.into_iter();
    let n = pairs.clone().count();
    let data: usize = pairs.clone().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + n * 8 + data);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Decodes pairs; an empty buffer, a single NUL and `N = 0` are all the empty map.
pub fn decode_pairs(bytes: &[u8]) -> Result<Pairs, String> {
    if bytes.len() <= 1 {
        return Ok(Vec::new());
    }
    let word = |at: usize| -> Result<usize, String> {
        bytes
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    let n = word(0)?;
    if n.saturating_mul(8).saturating_add(4) > bytes.len() {
        return Err(format!("{n} pairs do not fit in {} bytes", bytes.len()));
    }
    let mut pos = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut field = |len: usize| -> Result<Vec<u8>, String> {
            let end = pos.checked_add(len).ok_or("length overflow")?;
            let data = bytes
                .get(pos..end)
                .ok_or_else(|| format!("entry {i} is truncated"))?;
            if bytes.get(end) != Some(&0) {
                return Err(format!("entry {i} is not NUL-terminated"));
            }
            pos = end + 1;
            Ok(data.to_vec())
        };
        let key = field(word(4 + i * 8)?)?;
        let value = field(word(8 + i * 8)?)?;
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"app", b"web"), (b"tier", b"")];
        let bytes = encode_pairs(pairs.iter().copied());
        let back = decode_pairs(&bytes).unwrap();
        assert_eq!(
            back,
            vec![
                (b"app".to_vec(), b"web".to_vec()),
                (b"tier".to_vec(), vec![])
            ]
        );
        assert!(decode_pairs(&[0, 0, 0, 0]).unwrap().is_empty());
        assert!(decode_pairs(&[5, 0, 0, 0, 1]).is_err());
        for cut in 2..bytes.len() {
            assert!(decode_pairs(&bytes[..cut]).is_err());
        }
    }
}
