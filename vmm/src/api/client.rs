//! Blocking HTTP/1.1 client for the API socket, used by `vmm ctl` and by tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long `run_ctl` waits for the server before giving up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response header section the client accepts.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an API request could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the socket path.
    #[error("cannot connect to the API socket {path:?}: {source}; is a `vmm run --api-sock` using that path running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The method or path cannot be sent (not a token, not an absolute path).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Reading or writing the socket failed (including the timeout).
    #[error("API request failed: {0}")]
    Io(#[from] io::Error),
    /// The server's answer is not a well-formed HTTP response.
    #[error("malformed response from the API server: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// Exit status for `vmm ctl` (sysexits: 69 unavailable, 64 usage, 76 protocol, 74 I/O).
    pub fn exit_status(&self) -> i32 {
        match self {
            ClientError::Connect { .. } => 69,
            ClientError::InvalidRequest(_) => 64,
            ClientError::Io(_) => 74,
            ClientError::BadResponse(_) => 76,
        }
    }
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

/// Builds the request bytes; `Connection: close` so the server ends the exchange.
fn build_request(method: &str, path: &str, body: Option<&str>) -> Result<Vec<u8>, ClientError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ClientError::InvalidRequest(format!(
            "method {method:?} must be an upper-case word such as GET"
        )));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(format!(
            "path {path:?} must start with / and contain no spaces, e.g. /vm"
        )));
    }
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    Ok(req.into_bytes())
}

/// Parses a response head: status code and `Content-Length`.
fn parse_head(head: &[u8]) -> Result<(u16, Option<usize>), ClientError> {
    let bad = |what: &str| ClientError::BadResponse(what.to_string());
    let text = std::str::from_utf8(head).map_err(|_| bad("header section is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(bad(&format!("bad status line {status_line:?}")));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(bad(&format!("bad status line {status_line:?}")));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| bad(&format!("bad status code {code:?}")))?;
    let mut length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("bad header line {line:?}")))?;
        if name.eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            length = Some(
                value
                    .parse()
                    .map_err(|_| bad(&format!("bad Content-Length {value:?}")))?,
            );
        }
    }
    Ok((status, length))
}

/// Reads one final (non-1xx) response from `stream`: status and body.
pub fn read_response(stream: &mut impl Read) -> Result<(u16, Vec<u8>), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut eof = false;
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let (status, length) = parse_head(&buf[..end])?;
            let body_start = end + 4;
            if (100..200).contains(&status) {
                buf.drain(..body_start);
                continue;
            }
            let no_body = status == 204 || status == 304;
            let complete = match length {
                _ if no_body => Some(0),
                Some(n) if buf.len() >= body_start + n => Some(n),
                Some(_) => None,
                None if eof => Some(buf.len() - body_start),
                None => None,
            };
            if let Some(n) = complete {
                return Ok((status, buf[body_start..body_start + n].to_vec()));
            }
        } else if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::BadResponse(format!(
                "header section longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        if eof {
            return Err(ClientError::BadResponse(
                "connection closed before the response was complete".to_string(),
            ));
        }
        match stream.read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
}

/// Sends one request to the API socket at `sock` and returns the status code and
/// the response body (empty for 204).
///
/// `body`, if any, is sent as `application/json` with a `Content-Length`.
pub fn run_ctl(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let request = build_request(method, path, body)?;
    let mut stream = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    // A server that rejects a connection outright (503: too many connections)
    // answers and closes without reading; the answer is still worth reading.
    let written = stream.write_all(&request);
    let (status, body) = match (written, read_response(&mut stream)) {
        (_, Ok(resp)) => resp,
        (Err(e), Err(_)) => return Err(ClientError::Io(e)),
        (Ok(()), Err(e)) => return Err(e),
    };
    let body = String::from_utf8(body)
        .map_err(|_| ClientError::BadResponse("body is not UTF-8".to_string()))?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_requests_with_and_without_body() {
        let r = build_request("GET", "/vm", None).unwrap();
        assert_eq!(
            r,
            b"GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        let r = String::from_utf8(build_request("PATCH", "/vm", Some("{}")).unwrap()).unwrap();
        assert!(r.ends_with("Content-Length: 2\r\n\r\n{}"), "{r}");
        assert!(matches!(
            build_request("get", "/vm", None),
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            build_request("GET", "vm x", None),
            Err(ClientError::InvalidRequest(_))
        ));
    }

    #[test]
    fn reads_responses() {
        let mut r: &[u8] =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}extra";
        assert_eq!(read_response(&mut r).unwrap(), (200, b"{}".to_vec()));
        let mut r: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(read_response(&mut r).unwrap(), (204, Vec::new()));
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nuntil eof";
        assert_eq!(read_response(&mut r).unwrap(), (200, b"until eof".to_vec()));
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::BadResponse(m)) if m.contains("closed before")
        ));
        let mut r: &[u8] = b"SSH-2.0-OpenSSH\r\n\r\n";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::BadResponse(m)) if m.contains("status line")
        ));
    }

    #[test]
    fn connect_error_names_the_socket() {
        let err = run_ctl(Path::new("/nonexistent/api.sock"), "GET", "/vm", None).unwrap_err();
        assert_eq!(err.exit_status(), 69);
        assert!(err.to_string().contains("/nonexistent/api.sock"), "{err}");
    }
}
