//! A small, strict HTTP/1.1 request parser and response writer.
//!
//! Only what the control API needs: origin-form (or absolute-form) targets without
//! query strings, bodies framed by `Content-Length` (no chunked encoding), CRLF line
//! endings, keep-alive and pipelining. Every rejection is an [`HttpError`] that names
//! the cause and maps to an HTTP status.

use serde::Serialize;

/// Longest accepted header section (request line + headers + blank line).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Longest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Request method. Methods the API never routes are kept as `Other` so the router
/// can answer 405 (with `Allow`) rather than 400.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Put,
    Patch,
    Post,
    Delete,
    Other(String),
}

impl Method {
    /// The method named `s` (case-sensitive, as HTTP requires).
    pub fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_string()),
        }
    }

    /// The method as it appears on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Other(s) => s,
        }
    }
}

/// A complete, parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Absolute path, e.g. `/vm`.
    pub path: String,
    /// Header fields in order, names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Value of `Content-Length`, if the request had one.
    pub content_length: Option<usize>,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// First value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Result of feeding the bytes received so far to [`parse_request`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `expect_continue` is set once a complete header section
    /// asked for `100 Continue` and the body has not fully arrived.
    Incomplete { expect_continue: bool },
    /// A request and the number of bytes it used from the buffer.
    Complete(Request, usize),
}

/// Why a request was rejected. After any of these the connection cannot be
/// re-synchronised, so the server answers and closes it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line is not `METHOD /path HTTP/1.1`.
    #[error("bad request line {0:?}: expected `METHOD /path HTTP/1.1`")]
    BadRequestLine(String),
    /// The request line names an HTTP version other than 1.0 or 1.1.
    #[error("unsupported HTTP version {0:?}: use HTTP/1.1")]
    BadVersion(String),
    /// The request target is not an absolute path (or carries a query or fragment).
    #[error("bad request target {0:?}: expected a path such as /vm (no query string)")]
    BadTarget(String),
    /// A header line is not `Name: value`.
    #[error("bad header line {0:?}: expected `Name: value`")]
    BadHeader(String),
    /// A line ends with a bare LF instead of CRLF.
    #[error("lines must end with CRLF (\\r\\n), found a bare LF")]
    BareLf,
    /// `Content-Length` is not a decimal number, or appears twice with different values.
    #[error("bad Content-Length {0:?}: expected one decimal byte count")]
    BadContentLength(String),
    /// The request uses `Transfer-Encoding` (chunked bodies are not supported).
    #[error(
        "Transfer-Encoding {0:?} is not supported: send the body with a Content-Length header"
    )]
    TransferEncoding(String),
    /// The request carries an `Expect` other than `100-continue`.
    #[error("unsupported Expect {0:?}: only 100-continue is supported")]
    BadExpect(String),
    /// The header section is longer than [`MAX_HEAD_BYTES`].
    #[error("request header section exceeds {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The body is longer than [`MAX_BODY_BYTES`].
    #[error("request body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
}

impl HttpError {
    /// HTTP status code of this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadVersion(_) => 505,
            HttpError::TransferEncoding(_) => 411,
            HttpError::BadExpect(_) => 417,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            _ => 400,
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// Printable form of a rejected line for error messages (bounded length).
fn show(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    if s.chars().count() > 80 {
        let mut t: String = s.chars().take(80).collect();
        t.push_str("...");
        t
    } else {
        s.into_owned()
    }
}

/// Checks that every LF in `buf` is preceded by CR.
fn check_crlf(buf: &[u8]) -> Result<(), HttpError> {
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' && (i == 0 || buf[i - 1] != b'\r') {
            return Err(HttpError::BareLf);
        }
    }
    Ok(())
}

/// Splits `buf` at each CRLF (a stray CR stays in its line and is rejected later).
fn split_crlf(mut buf: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    while let Some(i) = find(buf, b"\r\n") {
        lines.push(&buf[..i]);
        buf = &buf[i + 2..];
    }
    lines.push(buf);
    lines
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

/// Parses the request line; returns method, path and whether it is HTTP/1.0.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, bool), HttpError> {
    let bad = || HttpError::BadRequestLine(show(line));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !is_token(method) || target.is_empty() {
        return Err(bad());
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(HttpError::BadVersion(v.to_string())),
        _ => return Err(bad()),
    };
    // Absolute-form (`http://host/path`) must be accepted by servers (RFC 9112 3.2.2).
    let path = match target.strip_prefix("http://") {
        Some(rest) => match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        },
        None => target,
    };
    let path_ok = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    if !path_ok {
        return Err(HttpError::BadTarget(show(target.as_bytes())));
    }
    Ok((Method::parse(method), path.to_string(), http10))
}

fn parse_header(line: &[u8]) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadHeader(show(line));
    let colon = line.iter().position(|&b| b == b':').ok_or_else(bad)?;
    // No whitespace between name and colon, no obs-fold (RFC 9112 5.1, 5.2).
    let name = std::str::from_utf8(&line[..colon]).map_err(|_| bad())?;
    if !is_token(name) {
        return Err(bad());
    }
    let value = &line[colon + 1..];
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad());
    }
    let value = String::from_utf8_lossy(value)
        .trim_matches([' ', '\t'])
        .to_string();
    Ok((name.to_ascii_lowercase(), value))
}

/// Parses one request from the front of `buf`.
///
/// Returns [`Parsed::Incomplete`] until the whole request (head and body) is in
/// `buf`; then the request and how many bytes it used. Limits are checked as soon as
/// they can be: an oversized head or `Content-Length` is rejected before the rest
/// arrives.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, HttpError> {
    // Tolerate empty lines before a request line (RFC 9112 2.2), e.g. a stray CRLF
    // after a previous body.
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") {
        start += 2;
        if start > MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
    }
    let rest = &buf[start..];
    let window = &rest[..rest.len().min(MAX_HEAD_BYTES)];
    let Some(head_end) = find(window, b"\r\n\r\n") else {
        check_crlf(window)?;
        // Reject a bad request line without waiting for the rest of the head.
        if let Some(eol) = find(window, b"\r\n") {
            parse_request_line(&window[..eol])?;
        }
        if rest.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
        return Ok(Parsed::Incomplete {
            expect_continue: false,
        });
    };
    let head = &rest[..head_end];
    check_crlf(head)?;
    let lines = split_crlf(head);
    let (method, path, http10) = parse_request_line(lines[0])?;
    let mut headers = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut keep_alive = !http10;
    let mut expect_continue = false;
    for line in &lines[1..] {
        let (name, value) = parse_header(line)?;
        match name.as_str() {
            "content-length" => {
                let bad = || HttpError::BadContentLength(value.clone());
                if value.is_empty()
                    || value.len() > 19
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(bad());
                }
                let n: u64 = value.parse().map_err(|_| bad())?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(bad());
                }
                content_length = Some(n);
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding(value)),
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(HttpError::BadExpect(value));
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    let body_len = match content_length {
        Some(n) if n > MAX_BODY_BYTES as u64 => return Err(HttpError::BodyTooLarge(n)),
        Some(n) => n as usize,
        None => 0,
    };
    let body_start = start + head_end + 4;
    if buf.len() < body_start + body_len {
        return Ok(Parsed::Incomplete { expect_continue });
    }
    let request = Request {
        method,
        path,
        headers,
        content_length: content_length.map(|n| n as usize),
        body: buf[body_start..body_start + body_len].to_vec(),
        keep_alive,
    };
    Ok(Parsed::Complete(request, body_start + body_len))
}

/// Reason phrase for the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Interim response sent when a client asked for `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response: status, optional JSON body, optional `Allow` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Serialized JSON body; `None` for 204.
    pub body: Option<Vec<u8>>,
    /// Value of the `Allow` header (405 responses).
    pub allow: Option<String>,
}

/// Body of every error response, Firecracker's shape.
#[derive(Serialize)]
struct Fault<'a> {
    fault_message: &'a str,
}

impl Response {
    /// `200 OK` with `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
                allow: None,
            },
            Err(e) => Response::fault(500, &format!("cannot serialize response: {e}")),
        }
    }

    /// `204 No Content`.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// An error response with body `{"fault_message": message}`.
    pub fn fault(status: u16, message: &str) -> Response {
        let body = serde_json::to_vec(&Fault {
            fault_message: message,
        })
        .unwrap_or_else(|_| b"{\"fault_message\":\"internal error\"}".to_vec());
        Response {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// Appends the serialized response to `out`. `close` adds `Connection: close`.
    pub fn write_to(&self, out: &mut Vec<u8>, close: bool) {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: vmm\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if let Some(body) = &self.body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        if let Some(body) = &self.body {
            out.extend_from_slice(body);
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
