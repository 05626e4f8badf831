//! DNS over TCP framing (RFC 1035 §4.2.2, RFC 7766 §8): each message is preceded by its
//! length as a big-endian `u16`.
//!
//! [`FrameReader::next_frame`] is cancel-safe (partial input stays in the reader's buffer),
//! so connection loops can race it against idle timers and shutdown signals without losing
//! bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads length-prefixed DNS messages from a byte stream.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    read: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(read: R) -> Self {
        Self {
            read,
            buf: Vec::with_capacity(1024),
        }
    }

    /// The next message, `None` at a clean end of stream. A stream that ends inside a
    /// message is an `UnexpectedEof` error. Zero-length frames are returned as empty
    /// messages (the caller rejects them like any malformed message).
    pub(crate) async fn next_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Ok(Some(frame));
            }
            // The most a frame can need is 2 + 65535 bytes; read in chunks so a slow
            // client costs one small buffer.
            let mut chunk = [0u8; 4096];
            let n = self.read.read(&mut chunk).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "stream ended inside a DNS message ({} bytes buffered)",
                            self.buf.len()
                        ),
                    ))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn take_frame(&mut self) -> Option<Vec<u8>> {
        if self.buf.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if self.buf.len() < 2 + len {
            return None;
        }
        let frame = self.buf[2..2 + len].to_vec();
        self.buf.drain(..2 + len);
        Some(frame)
    }
}

/// Writes one message with its length prefix, in one write so pipelined messages from
/// several tasks never interleave (callers serialize access to the writer).
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    write: &mut W,
    message: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte DNS message does not fit a TCP frame",
                message.len()
            ),
        )
    })?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    write.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_split_across_reads_and_pipelined() {
        let (mut client, server) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            write_frame(&mut client, b"first").await.expect("write");
            write_frame(&mut client, b"").await.expect("write");
            write_frame(&mut client, &[7u8; 300]).await.expect("write");
            client.write_all(&[0, 9, 1]).await.expect("partial");
        });
        let mut reader = FrameReader::new(server);
        assert_eq!(
            reader.next_frame().await.expect("ok"),
            Some(b"first".to_vec())
        );
        assert_eq!(reader.next_frame().await.expect("ok"), Some(Vec::new()));
        assert_eq!(reader.next_frame().await.expect("ok"), Some(vec![7u8; 300]));
        writer.await.expect("writer");
        let error = reader.next_frame().await.expect_err("truncated frame");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn clean_end_is_none() {
        let (client, server) = tokio::io::duplex(8);
        drop(client);
        assert_eq!(
            FrameReader::new(server).next_frame().await.expect("ok"),
            None
        );
    }
}
