//! The slice of NATS's text protocol the peer benchmark needs: CONNECT, SUB, PUB, PING/PONG
//! out, and a reader for what comes back. Over WebSocket the protocol is a byte stream cut
//! into frames anywhere, so the reader keeps what it has not parsed yet.

/// Sent once the WebSocket is open: no acks for every command, no headers.
pub const CONNECT: &str = "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\
                           \"protocol\":1,\"name\":\"loadgen\"}\r\n";

/// What the server sent, one protocol operation at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOp<'a> {
    Msg {
        subject: &'a [u8],
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Info,
    Ok,
    Err(String),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    #[error("unparseable line from the server: {0}")]
    BadLine(String),
}

/// Subscribes `sid` to `subject`, then asks for a PONG, which arrives only after the SUB is
/// in force.
pub fn subscribe_ops(subject: &str, sid: u32) -> String {
    format!("{CONNECT}SUB {subject} {sid}\r\nPING\r\n")
}

/// Appends one PUB operation to `out`.
pub fn push_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[derive(Default)]
pub struct Reader {
    pending: Vec<u8>,
}

impl Reader {
    /// Adds `bytes` and hands every complete operation to `on_op`, in order.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut on_op: impl FnMut(ServerOp<'_>),
    ) -> Result<(), NatsError> {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while let Some(used) = next_op(&self.pending[at..], &mut on_op)? {
            at += used;
        }
        self.pending.drain(..at);
        Ok(())
    }
}

/// Parses one operation from the front of `buf`; `None` when it is not all there yet.
fn next_op(buf: &[u8], on_op: &mut impl FnMut(ServerOp<'_>)) -> Result<Option<usize>, NatsError> {
    let Some(eol) = memchr::memmem::find(buf, b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[..eol];
    let after_line = eol + 2;
    if let Some(args) = line.strip_prefix(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let mut parts = args.split(|b| *b == b' ').filter(|p| !p.is_empty());
        let subject = parts.next().ok_or_else(|| bad(line))?;
        let size = parts
            .next_back()
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad(line))?;
        let end = after_line + size + 2;
        if buf.len() < end {
            return Ok(None);
        }
        on_op(ServerOp::Msg {
            subject,
            payload: &buf[after_line..after_line + size],
        });
        return Ok(Some(end));
    }
    let op = match line {
        b"PING" => ServerOp::Ping,
        b"PONG" => ServerOp::Pong,
        b"+OK" => ServerOp::Ok,
        _ if line.starts_with(b"INFO ") => ServerOp::Info,
        _ if line.starts_with(b"-ERR") => {
            ServerOp::Err(String::from_utf8_lossy(&line[4..]).trim().to_owned())
        }
        _ => return Err(bad(line)),
    };
    on_op(op);
    Ok(Some(after_line))
}

fn bad(line: &[u8]) -> NatsError {
    NatsError::BadLine(String::from_utf8_lossy(line).chars().take(80).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(reader: &mut Reader, bytes: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        reader
            .feed(bytes, |op| {
                seen.push(match op {
                    ServerOp::Msg { subject, payload } => format!(
                        "msg {} {}",
                        String::from_utf8_lossy(subject),
                        String::from_utf8_lossy(payload)
                    ),
                    other => format!("{other:?}"),
                })
            })
            .unwrap();
        seen
    }

    #[test]
    fn operations_split_across_frames_come_out_whole() {
        let mut r = Reader::default();
        let stream =
            b"INFO {\"x\":1}\r\nPING\r\nMSG user.a 1 5\r\nhe\r\no\r\nMSG user.b 1 r 2\r\nok\r\n";
        let mut seen = Vec::new();
        for chunk in stream.chunks(3) {
            seen.extend(ops(&mut r, chunk));
        }
        assert_eq!(
            seen,
            ["Info", "Ping", "msg user.a he\r\no", "msg user.b ok"]
        );
    }

    #[test]
    fn errors_and_garbage_are_reported() {
        let mut r = Reader::default();
        assert_eq!(
            ops(&mut r, b"-ERR 'Slow Consumer'\r\n"),
            ["Err(\"'Slow Consumer'\")"]
        );
        assert!(Reader::default().feed(b"WAT\r\n", |_| {}).is_err());
    }

    #[test]
    fn pub_operations_carry_their_length() {
        let mut out = Vec::new();
        push_pub(&mut out, "user.a", b"{\"seq\":1}");
        assert_eq!(out, b"PUB user.a 9\r\n{\"seq\":1}\r\n");
        assert!(subscribe_ops("user.a", 7).ends_with("SUB user.a 7\r\nPING\r\n"));
    }
}
