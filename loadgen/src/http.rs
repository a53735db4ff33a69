//! A keep-alive HTTP/1.1 client that only POSTs JSON and reads replies with a `Content-Length`:
//! all the publish endpoints need, and few enough moving parts that it costs the load
//! generator little.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection mid-reply")]
    Closed,
    #[error("unreadable reply: {0}")]
    Malformed(&'static str),
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct HttpClient {
    stream: TcpStream,
    host: String,
    request: Vec<u8>,
    inbox: Vec<u8>,
}

/// Largest reply head accepted; the endpoints send a few short headers.
const MAX_HEAD: usize = 16 * 1024;

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Result<Self, HttpError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            host: addr.to_string(),
            request: Vec::with_capacity(64 * 1024),
            inbox: Vec::with_capacity(4096),
        })
    }

    /// Sends one POST and waits for its reply; the connection stays open for the next.
    pub async fn post_json(
        &mut self,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<Reply, HttpError> {
        self.request.clear();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n",
            self.host,
            body.len()
        );
        self.request.extend_from_slice(head.as_bytes());
        if let Some(token) = bearer {
            self.request.extend_from_slice(b"Authorization: Bearer ");
            self.request.extend_from_slice(token.as_bytes());
            self.request.extend_from_slice(b"\r\n");
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await?;
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> Result<Reply, HttpError> {
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&self.inbox, b"\r\n\r\n") {
                break at + 4;
            }
            if self.inbox.len() > MAX_HEAD {
                return Err(HttpError::Malformed("reply head too long"));
            }
            self.fill().await?;
        };
        let (status, length) = parse_head(&self.inbox[..head_end])?;
        while self.inbox.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.inbox[head_end..head_end + length].to_vec();
        self.inbox.drain(..head_end + length);
        Ok(Reply { status, body })
    }

    async fn fill(&mut self) -> Result<(), HttpError> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        self.inbox.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The status code and body length of a reply head.
fn parse_head(head: &[u8]) -> Result<(u16, usize), HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head is not text"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(HttpError::Malformed("no status line"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Limitation: chunked replies are refused, not decoded; the publish endpoints
            // (axum's `Json`) always send a length. Decoding chunks here would lift it.
            return Err(HttpError::Malformed("chunked replies are not supported"));
        }
    }
    let length = length.ok_or(HttpError::Malformed("no Content-Length"))?;
    Ok((status, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_status_and_length() {
        let head = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n\
                     content-length: 17\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), (413, 17));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_head(chunked).is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn replies_are_read_whole_across_reads_and_the_connection_is_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for n in 0..2u8 {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.ends_with(b"{}") {
                    let k = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..k]);
                }
                assert!(got.starts_with(b"POST /p HTTP/1.1\r\n"));
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n")
                    .await
                    .unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                s.write_all(&[b'[', b'0' + n, b']']).await.unwrap();
            }
        });
        let mut client = HttpClient::connect(addr).await.unwrap();
        for n in 0..2u8 {
            let reply = client.post_json("/p", Some("t"), b"{}").await.unwrap();
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body, vec![b'[', b'0' + n, b']']);
        }
        server.await.unwrap();
    }
}
