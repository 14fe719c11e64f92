//! Tests of the HTTP request parser and response writer.

use super::*;

fn complete(buf: &[u8]) -> (Request, usize) {
    match parse_request(buf) {
        Ok(Parsed::Complete(req, used)) => (req, used),
        other => panic!("expected a complete request, got {other:?}"),
    }
}

fn rejects(buf: &[u8]) -> HttpError {
    match parse_request(buf) {
        Err(e) => e,
        other => panic!("expected an error for {:?}, got {other:?}", show(buf)),
    }
}

#[test]
fn parses_a_get() {
    let raw = b"GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
    let (req, used) = complete(raw);
    assert_eq!(used, raw.len());
    assert_eq!(req.method, Method::Get);
    assert_eq!(req.path, "/vm");
    assert_eq!(req.header("host"), Some("localhost"));
    assert_eq!(req.content_length, None);
    assert!(req.body.is_empty());
    assert!(req.keep_alive);
}

#[test]
fn parses_a_body_and_leaves_the_next_request() {
    let raw = b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\nContent-Type: application/json\r\n\r\n{\"state\":\"Paused\"}GET /vm HTTP/1.1\r\n\r\n";
    let (req, used) = complete(raw);
    assert_eq!(req.method, Method::Patch);
    assert_eq!(req.body, b"{\"state\":\"Paused\"}");
    assert_eq!(req.content_length, Some(18));
    let (next, used2) = complete(&raw[used..]);
    assert_eq!(next.method, Method::Get);
    assert_eq!(used + used2, raw.len());
}

#[test]
fn incomplete_until_every_byte_arrives() {
    let raw = b"PATCH /vm HTTP/1.1\r\nContent-Length: 4\r\n\r\nnull";
    for n in 0..raw.len() {
        assert_eq!(
            parse_request(&raw[..n]),
            Ok(Parsed::Incomplete {
                expect_continue: false
            }),
            "prefix of {n} bytes"
        );
    }
    assert_eq!(complete(raw).1, raw.len());
}

#[test]
fn expect_continue_is_reported_while_the_body_is_missing() {
    let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    assert_eq!(
        parse_request(head),
        Ok(Parsed::Incomplete {
            expect_continue: true
        })
    );
    let mut full = head.to_vec();
    full.extend_from_slice(b"{}");
    assert_eq!(complete(&full).0.body, b"{}");
    assert_eq!(
        rejects(b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n"),
        HttpError::BadExpect("something".into())
    );
}

#[test]
fn connection_semantics() {
    assert!(
        !complete(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
            .0
            .keep_alive
    );
    assert!(!complete(b"GET /vm HTTP/1.0\r\n\r\n").0.keep_alive);
    assert!(
        complete(b"GET /vm HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .0
            .keep_alive
    );
}

#[test]
fn other_forms_accepted() {
    // Absolute-form target, unknown method token, leading empty line, header OWS.
    let (req, _) = complete(b"\r\nBREW http://localhost/vm HTTP/1.1\r\nX-A:\t v \r\n\r\n");
    assert_eq!(req.method, Method::Other("BREW".into()));
    assert_eq!(req.path, "/vm");
    assert_eq!(req.header("x-a"), Some("v"));
    // Identical duplicate Content-Length is allowed.
    let (req, _) = complete(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx");
    assert_eq!(req.body, b"x");
}

#[test]
fn bad_request_lines() {
    for raw in [
        &b"GET /vm\r\n\r\n"[..],
        b"GET  /vm HTTP/1.1\r\n\r\n",
        b"GET /vm HTTP/1.1 extra\r\n\r\n",
        b"G(T /vm HTTP/1.1\r\n\r\n",
        b"GET /vm FTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        assert!(
            matches!(rejects(raw), HttpError::BadRequestLine(_)),
            "{:?}",
            show(raw)
        );
    }
    // Detected as soon as the request line is complete.
    assert!(matches!(
        rejects(b"HELLO\r\n"),
        HttpError::BadRequestLine(l) if l == "HELLO"
    ));
    assert_eq!(
        rejects(b"GET /vm HTTP/2.0\r\n\r\n"),
        HttpError::BadVersion("HTTP/2.0".into())
    );
    assert_eq!(rejects(b"GET /vm HTTP/2.0\r\n\r\n").status(), 505);
}

#[test]
fn bad_targets() {
    for target in ["vm", "/vm?x=1", "/vm#f", "*", "/v\x01m"] {
        let raw = format!("GET {target} HTTP/1.1\r\n\r\n");
        let e = rejects(raw.as_bytes());
        assert!(matches!(e, HttpError::BadTarget(_)), "{target}: {e:?}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn bad_headers() {
    for line in [
        "NoColon",
        "Bad Name: x",
        "Name : x",
        " folded: x",
        ": empty name",
        "X: a\x01b",
        "X: a\rb",
    ] {
        let raw = format!("GET /vm HTTP/1.1\r\n{line}\r\n\r\n");
        assert!(
            matches!(rejects(raw.as_bytes()), HttpError::BadHeader(_)),
            "{line:?}"
        );
    }
}

#[test]
fn bare_lf_is_rejected_without_waiting() {
    assert_eq!(rejects(b"GET /vm HTTP/1.1\n"), HttpError::BareLf);
    assert_eq!(
        rejects(b"GET /vm HTTP/1.1\r\nHost: x\n\r\n\r\n"),
        HttpError::BareLf
    );
}

#[test]
fn bad_content_lengths() {
    for value in [
        "",
        "-1",
        "+5",
        "0x10",
        "1 2",
        "99999999999999999999",
        "5, 5",
    ] {
        let raw = format!("PUT /x HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
        assert!(
            matches!(rejects(raw.as_bytes()), HttpError::BadContentLength(_)),
            "{value:?}"
        );
    }
    assert!(matches!(
        rejects(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"),
        HttpError::BadContentLength(_)
    ));
}

#[test]
fn chunked_bodies_need_content_length() {
    let e = rejects(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(e.status(), 411);
    assert!(e.to_string().contains("Content-Length"));
}

#[test]
fn limits() {
    let big = MAX_BODY_BYTES + 1;
    let raw = format!("PUT /x HTTP/1.1\r\nContent-Length: {big}\r\n\r\n");
    // Rejected from the head alone, before the body is sent.
    let e = rejects(raw.as_bytes());
    assert_eq!(e, HttpError::BodyTooLarge(big as u64));
    assert_eq!(e.status(), 413);
    let ok = format!(
        "PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n{}",
        "x".repeat(MAX_BODY_BYTES)
    );
    assert_eq!(complete(ok.as_bytes()).0.body.len(), MAX_BODY_BYTES);

    let mut long = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
    long.resize(MAX_HEAD_BYTES, b'a');
    let e = rejects(&long);
    assert_eq!(e, HttpError::HeadTooLarge);
    assert_eq!(e.status(), 431);
    // Just under the limit still parses.
    let mut fits = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
    fits.resize(MAX_HEAD_BYTES - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    assert_eq!(complete(&fits).1, MAX_HEAD_BYTES);
    assert_eq!(
        rejects(&b"\r\n".repeat(MAX_HEAD_BYTES)),
        HttpError::HeadTooLarge
    );
}

#[test]
fn writes_responses() {
    let mut out = Vec::new();
    Response::json(&serde_json::json!({"a": 1})).write_to(&mut out, false);
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nServer: vmm\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    );
    let mut out = Vec::new();
    Response::no_content().write_to(&mut out, true);
    assert_eq!(
        out,
        b"HTTP/1.1 204 No Content\r\nServer: vmm\r\nConnection: close\r\n\r\n"
    );
    let mut resp = Response::fault(405, "say \"no\"");
    resp.allow = Some("GET".into());
    let mut out = Vec::new();
    resp.write_to(&mut out, false);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nAllow: GET\r\n"));
    assert!(
        text.ends_with(r#"{"fault_message":"say \"no\""}"#),
        "{text}"
    );
}
