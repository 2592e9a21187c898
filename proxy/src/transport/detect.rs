//! Protocol detection on an accepted connection.
//!
//! The first bytes a client sends decide how the connection is proxied: HTTP/1, HTTP/2
//! with prior knowledge (h2c and gRPC), a TLS ClientHello (forwarded opaque, SNI kept for
//! logs), or anything else as opaque TCP. A client that sends nothing within the detect
//! window is probably waiting for a server that speaks first (MySQL, SMTP, Redis
//! replies…), so the connection becomes opaque at once instead of stalling.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A ClientHello fits in one TLS record of at most 16 KiB plus its header.
const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// `mesh`: the ClientHello offers a weft mesh ALPN, so a peer proxy is calling.
    Tls {
        sni: Option<String>,
        mesh: bool,
    },
    Opaque,
    /// Nothing arrived within the detect window: a server-first protocol, or a slow
    /// client. The caller decides (see `transport::first_speaker`).
    Silent,
}

/// Why detection ended where it did; each value is a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Http1,
    Http2,
    Tls,
    /// Bytes arrived but matched no known protocol.
    Opaque,
    /// The client sent nothing within the detect window (server-speaks-first).
    Silent,
    /// The port is configured as opaque; no bytes were read.
    OpaquePort,
    /// The client stopped part-way through a recognisable prefix.
    Incomplete,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Http1 => "http1",
            Outcome::Http2 => "h2",
            Outcome::Tls => "tls",
            Outcome::Opaque => "opaque",
            Outcome::Silent => "silent",
            Outcome::OpaquePort => "opaque-port",
            Outcome::Incomplete => "incomplete",
        }
    }
}

#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    pub outcome: Outcome,
    /// Bytes read during detection; they must be replayed before the rest of the stream.
    pub buffered: BytesMut,
}

/// What detection may read and wait for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long to wait for the client's first bytes.
    pub first_byte: Duration,
    /// How long a client may dribble a recognisable prefix before it is judged on what
    /// it sent.
    pub complete: Duration,
    /// The longest request head (`WEFT_MAX_HEADER_BYTES`): an HTTP/1 request line is
    /// looked for within it.
    pub max_head: usize,
}

/// Reads from `io` until the protocol is known.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, limits: Limits) -> std::io::Result<Detected> {
    let mut buf = BytesMut::with_capacity(1024);
    match tokio::time::timeout(limits.first_byte, io.read_buf(&mut buf)).await {
        Err(_) => return Ok(done(Protocol::Silent, Outcome::Silent, buf)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(0)) => return Ok(done(Protocol::Opaque, Outcome::Opaque, buf)),
        Ok(Ok(_)) => {}
    }
    let deadline = tokio::time::Instant::now() + limits.complete;
    loop {
        match classify(&buf, limits.max_head) {
            Verdict::Known(protocol, outcome) => return Ok(done(protocol, outcome, buf)),
            Verdict::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            // A stalled start of an HTTP request is still HTTP: let the codec answer it.
            Err(_) | Ok(Ok(0)) if looks_like_http1(&buf) => {
                return Ok(done(Protocol::Http1, Outcome::Incomplete, buf))
            }
            Err(_) | Ok(Ok(0)) => return Ok(done(Protocol::Opaque, Outcome::Incomplete, buf)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => {}
        }
    }
}

/// The verdict on the first bytes of a connection, `None` while more are needed: what
/// `detect` decides on, for fuzzing and tests.
pub fn verdict(buf: &[u8], max_head: usize) -> Option<(Protocol, Outcome)> {
    match classify(buf, max_head) {
        Verdict::Known(p, o) => Some((p, o)),
        Verdict::NeedMore => None,
    }
}

fn done(protocol: Protocol, outcome: Outcome, buffered: BytesMut) -> Detected {
    Detected { protocol, outcome, buffered }
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Known(Protocol, Outcome),
    NeedMore,
}

/// Decides on what has been read so far.
fn classify(buf: &[u8], max_head: usize) -> Verdict {
    use Verdict::*;
    // HTTP/2 prior knowledge: the full preface, byte for byte.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Known(Protocol::Http2, Outcome::Http2) } else { NeedMore };
    }
    // TLS handshake record carrying a ClientHello.
    if buf[0] == 0x16 {
        return match buf.len() > MAX_CLIENT_HELLO {
            true => Verdict::Known(Protocol::Opaque, Outcome::Opaque),
            false => classify_tls(buf),
        };
    }
    classify_http1(buf, max_head)
}

fn classify_tls(buf: &[u8]) -> Verdict {
    if buf.len() < 6 {
        return Verdict::NeedMore;
    }
    // Record version 3.x and handshake type client_hello (1).
    if buf[1] != 0x03 || buf[5] != 0x01 {
        return Verdict::Known(Protocol::Opaque, Outcome::Opaque);
    }
    // rustls parses the ClientHello: untrusted bytes go through a well-tested parser.
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Verdict::Known(Protocol::Opaque, Outcome::Opaque);
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let sni = hello.server_name().map(str::to_string);
            let mesh = hello.alpn().is_some_and(|mut protos| protos.any(super::tls::is_mesh_alpn));
            Verdict::Known(Protocol::Tls { sni, mesh }, Outcome::Tls)
        }
        Ok(None) => Verdict::NeedMore,
        // Malformed hello: still TLS-looking bytes, forward them untouched.
        Err(_) => Verdict::Known(Protocol::Tls { sni: None, mesh: false }, Outcome::Tls),
    }
}

/// Methods that make a connection HTTP/1 as soon as they are followed by a space, so a
/// client that stalls mid-request-line meets the HTTP header timeout (408), not an
/// opaque forward of half a request.
const KNOWN_METHODS: [&[u8]; 9] =
    [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"];

/// RFC 9110 §5.6.2 `tchar`: what a method token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9112 §2.2: a server ignores empty lines before the request line.
fn skip_empty_lines(buf: &[u8]) -> &[u8] {
    let n = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    &buf[n..]
}

/// Whether the bytes so far can only be the start of an HTTP/1 request: a method token
/// followed by a space, after optional empty lines (or a known method's prefix).
fn looks_like_http1(buf: &[u8]) -> bool {
    let buf = skip_empty_lines(buf);
    let token = buf.iter().take_while(|&&b| is_tchar(b)).count();
    let known_prefix = KNOWN_METHODS.iter().any(|m| buf.len() < m.len() && m.starts_with(buf));
    (token > 0 && buf.get(token) == Some(&b' ')) || (!buf.is_empty() && known_prefix)
}

/// HTTP/1 is recognised by the shape of its request line, `token SP target SP HTTP/1.x`,
/// after optional empty lines, looked for within the request head limit. A known method
/// and a space decide at once. A line too long for the limit that still has the shape's
/// start (token, space, no control bytes) is HTTP too, for the codec to refuse (414/431)
/// rather than an opaque stream that skips every HTTP check.
fn classify_http1(buf: &[u8], max_head: usize) -> Verdict {
    use Verdict::*;
    let opaque = Known(Protocol::Opaque, Outcome::Opaque);
    let http = Known(Protocol::Http1, Outcome::Http1);
    let line = skip_empty_lines(buf);
    if line.is_empty() {
        return if buf.len() < max_head { NeedMore } else { opaque };
    }
    // Long tokens are not methods.
    let token = line.iter().take_while(|&&b| is_tchar(b)).count();
    if token >= 32 {
        return opaque;
    }
    if token == line.len() {
        return NeedMore;
    }
    if token == 0 || line[token] != b' ' {
        return opaque;
    }
    if KNOWN_METHODS.contains(&&line[..token]) {
        return http;
    }
    let Some(eol) = line.iter().position(|&b| b == b'\n') else {
        // A CR may be the first half of the line's end.
        let rest = &line[token + 1..];
        let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
        let printable = rest.iter().all(|&b| (b > b' ' && b != 0x7f) || b == b' ');
        return match (printable, buf.len() >= max_head) {
            (false, _) => opaque,
            (true, true) => http,
            (true, false) => NeedMore,
        };
    };
    let line = line[..eol].strip_suffix(b"\r").unwrap_or(&line[..eol]);
    let mut parts = line[token + 1..].rsplitn(2, |&b| b == b' ');
    let (version, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let well_formed = !target.is_empty()
        && target.iter().all(|&b| b > b' ' && b != 0x7f)
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0");
    if well_formed {
        http
    } else {
        opaque
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn known(buf: &[u8]) -> Protocol {
        match classify(buf, MAX) {
            Verdict::Known(p, _) => p,
            Verdict::NeedMore => panic!("needs more: {buf:?}"),
        }
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(known(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Protocol::Http1);
        assert_eq!(known(b"POST /x?y=1 HTTP/1.0\r\n"), Protocol::Http1);
        assert_eq!(known(b"CONNECT a:443 HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(known(b"GET /long-path-still-arriving"), Protocol::Http1);
        assert_eq!(known(b"PROPFIND /dav HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"GE", MAX), Verdict::NeedMore);
        assert_eq!(classify(b"PROPFIND /dav", MAX), Verdict::NeedMore);
    }

    #[test]
    fn any_method_token_and_leading_empty_lines_are_http1() {
        // Methods are tokens (RFC 9110 §9.1), case-sensitive; empty lines before the
        // request line are ignored (RFC 9112 §2.2).
        assert_eq!(known(b"get / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(known(b"post / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(known(b"M-SEARCH * HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(known(b"\r\n\r\nPOST / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(known(b"\nGET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"\r\n", MAX), Verdict::NeedMore);
        // A request line longer than any window still has HTTP's shape: the codec refuses it.
        let long = format!("PROPFIND /{} HTTP/1.1\r\n", "a".repeat(MAX));
        assert_eq!(known(&long.as_bytes()[..MAX]), Protocol::Http1);
        // A stalled token-and-space start is HTTP for the codec's timeout.
        assert!(looks_like_http1(b"\r\npropfind /x"));
        assert!(looks_like_http1(b"GE"));
        assert!(!looks_like_http1(b"\x00\x01"));
    }

    #[test]
    fn not_http1() {
        assert_eq!(known(b"MKCOL / HTTP/2.0\r\n"), Protocol::Opaque);
        assert_eq!(known(b"PING\r\n"), Protocol::Opaque);
        assert_eq!(known(b"*1\r\n$4\r\nPING\r\n"), Protocol::Opaque);
        assert_eq!(known(b"\x00\x01binary"), Protocol::Opaque);
        assert_eq!(known(b"SSH-2.0-OpenSSH_9.2\r\n"), Protocol::Opaque);
    }

    #[test]
    fn h2_preface() {
        assert_eq!(known(H2_PREFACE), Protocol::Http2);
        assert_eq!(classify(&H2_PREFACE[..10], MAX), Verdict::NeedMore);
        // `PRI` alone could still become the preface.
        assert_eq!(classify(b"PRI", MAX), Verdict::NeedMore);
        assert_eq!(known(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Protocol::Opaque);
    }

    fn client_hello(sni: &str) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tls_client_hello_with_sni() {
        let hello = client_hello("backend.example.svc");
        assert_eq!(known(&hello), Protocol::Tls { sni: Some("backend.example.svc".into()), mesh: false });
        // Part of a ClientHello asks for more rather than guessing.
        assert_eq!(classify(&hello[..40], MAX), Verdict::NeedMore);
    }

    #[test]
    fn malformed_tls_is_not_a_crash() {
        assert_eq!(known(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), Protocol::Opaque);
        // A ClientHello record whose body is garbage.
        let mut bad = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(classify(&bad, MAX), Verdict::Known(_, _)));
        bad.truncate(7);
        assert_eq!(classify(&bad, MAX), Verdict::NeedMore);
    }

    /// Untrusted bytes: random inputs, random prefixes of real protocols and mutated
    /// ClientHellos never panic, and a verdict never changes as more bytes arrive.
    #[test]
    fn arbitrary_bytes_never_panic_and_verdicts_are_stable() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let hello = client_hello("fuzz.example");
        let seeds: [&[u8]; 4] =
            [&hello, H2_PREFACE, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"MKCOL /x HTTP/1.1\r\n"];
        for i in 0..20_000 {
            let mut buf: Vec<u8> = if i % 2 == 0 {
                (0..(next() % 64 + 1)).map(|_| next() as u8).collect()
            } else {
                let mut b = seeds[i % seeds.len()].to_vec();
                for _ in 0..(next() % 4) {
                    let at = next() as usize % b.len();
                    b[at] = next() as u8;
                }
                b
            };
            buf.truncate((next() as usize % buf.len()) + 1);
            let full = classify(&buf, MAX);
            for cut in 1..buf.len() {
                if let Verdict::Known(p, _) = classify(&buf[..cut], MAX) {
                    // An early verdict on a prefix must be the one the whole input gets.
                    let Verdict::Known(q, _) = &full else {
                        panic!("{buf:?}: decided at {cut}, not in full")
                    };
                    assert_eq!(std::mem::discriminant(&p), std::mem::discriminant(q), "{buf:?} at {cut}");
                    break;
                }
            }
        }
    }

    #[tokio::test]
    async fn silent_client_is_opaque_at_once() {
        let (mut client, _server) = tokio::io::duplex(64);
        let t = std::time::Instant::now();
        let d = detect(&mut client, limits(50, 5000)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Silent, Outcome::Silent));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn slow_prefix_gives_up_as_incomplete_keeping_bytes() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"\x01\x02 MKCOL").await.unwrap();
        let d = detect(&mut a, limits(50, 100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Opaque, Outcome::Opaque));
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"\x16\x03").await.unwrap();
        let d = detect(&mut a, limits(50, 100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Opaque, Outcome::Incomplete));
        assert_eq!(&d.buffered[..], b"\x16\x03");
    }

    #[tokio::test]
    async fn stalled_known_method_is_left_to_the_http_codec() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GE").await.unwrap();
        let d = detect(&mut a, limits(50, 100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Http1, Outcome::Incomplete));
        // Any method token and a space, stalled: still HTTP, for the codec's 408.
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"MKCOL /").await.unwrap();
        let d = detect(&mut a, limits(50, 100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Http1, Outcome::Incomplete));
    }

    fn limits(first_ms: u64, complete_ms: u64) -> Limits {
        Limits {
            first_byte: Duration::from_millis(first_ms),
            complete: Duration::from_millis(complete_ms),
            max_head: MAX,
        }
    }
}
