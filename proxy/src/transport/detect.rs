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
/// Enough for any real request line; a longer first line is not treated as HTTP.
const MAX_REQUEST_LINE: usize = 16 * 1024;
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

/// Reads from `io` until the protocol is known.
///
/// `first_byte_timeout` bounds the wait for the client's first bytes; `complete_timeout`
/// bounds how long a client may dribble a recognisable prefix before we give up and
/// forward what we have as opaque.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    first_byte_timeout: Duration,
    complete_timeout: Duration,
) -> std::io::Result<Detected> {
    let mut buf = BytesMut::with_capacity(1024);
    match tokio::time::timeout(first_byte_timeout, io.read_buf(&mut buf)).await {
        Err(_) => return Ok(done(Protocol::Opaque, Outcome::Silent, buf)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(0)) => return Ok(done(Protocol::Opaque, Outcome::Opaque, buf)),
        Ok(Ok(_)) => {}
    }
    let deadline = tokio::time::Instant::now() + complete_timeout;
    loop {
        match classify(&buf) {
            Verdict::Known(protocol, outcome) => return Ok(done(protocol, outcome, buf)),
            Verdict::NeedMore => {}
        }
        if buf.len() >= MAX_CLIENT_HELLO.max(MAX_REQUEST_LINE) {
            return Ok(done(Protocol::Opaque, Outcome::Opaque, buf));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            // A stalled start of an HTTP request is still HTTP: let the codec answer it.
            Err(_) | Ok(Ok(0)) if is_known_method_prefix(&buf) => {
                return Ok(done(Protocol::Http1, Outcome::Incomplete, buf))
            }
            Err(_) | Ok(Ok(0)) => return Ok(done(Protocol::Opaque, Outcome::Incomplete, buf)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) => {}
        }
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
fn classify(buf: &[u8]) -> Verdict {
    use Verdict::*;
    // HTTP/2 prior knowledge: the full preface, byte for byte.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Known(Protocol::Http2, Outcome::Http2) } else { NeedMore };
    }
    // TLS handshake record carrying a ClientHello.
    if buf[0] == 0x16 {
        return classify_tls(buf);
    }
    classify_http1(buf)
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
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// Whether `buf` is a known method (with its space) or a prefix of one.
fn is_known_method_prefix(buf: &[u8]) -> bool {
    KNOWN_METHODS.iter().any(|m| buf.starts_with(m) || (buf.len() < m.len() && m.starts_with(buf)))
}

/// HTTP/1 is recognised by a known method, or by a request line of another method:
/// `METHOD SP target SP HTTP/1.x CRLF`.
fn classify_http1(buf: &[u8]) -> Verdict {
    use Verdict::*;
    if KNOWN_METHODS.iter().any(|m| buf.starts_with(m)) {
        return Known(Protocol::Http1, Outcome::Http1);
    }
    let opaque = Known(Protocol::Opaque, Outcome::Opaque);
    // Other methods are tokens; upper-case letters cover the registered ones.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len < 20 { NeedMore } else { opaque };
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return opaque;
    }
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() < MAX_REQUEST_LINE { NeedMore } else { opaque };
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Known(Protocol::Http1, Outcome::Http1)
    } else {
        opaque
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(buf: &[u8]) -> Protocol {
        match classify(buf) {
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
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"PROPFIND /dav"), Verdict::NeedMore);
    }

    #[test]
    fn not_http1() {
        assert_eq!(known(b"get / HTTP/1.1\r\n"), Protocol::Opaque);
        assert_eq!(known(b"MKCOL / HTTP/2.0\r\n"), Protocol::Opaque);
        assert_eq!(known(b"PING\r\n"), Protocol::Opaque);
        assert_eq!(known(b"*1\r\n$4\r\nPING\r\n"), Protocol::Opaque);
        assert_eq!(known(b"\x00\x01binary"), Protocol::Opaque);
        assert_eq!(known(b"SSH-2.0-OpenSSH_9.2\r\n"), Protocol::Opaque);
    }

    #[test]
    fn h2_preface() {
        assert_eq!(known(H2_PREFACE), Protocol::Http2);
        assert_eq!(classify(&H2_PREFACE[..10]), Verdict::NeedMore);
        // `PRI` alone could still become the preface.
        assert_eq!(classify(b"PRI"), Verdict::NeedMore);
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
        assert_eq!(classify(&hello[..40]), Verdict::NeedMore);
    }

    #[test]
    fn malformed_tls_is_not_a_crash() {
        assert_eq!(known(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), Protocol::Opaque);
        // A ClientHello record whose body is garbage.
        let mut bad = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(classify(&bad), Verdict::Known(_, _)));
        bad.truncate(7);
        assert_eq!(classify(&bad), Verdict::NeedMore);
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
            let full = classify(&buf);
            for cut in 1..buf.len() {
                if let Verdict::Known(p, _) = classify(&buf[..cut]) {
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
        let d = detect(&mut client, Duration::from_millis(50), Duration::from_secs(5)).await.unwrap();
        assert_eq!(d.outcome, Outcome::Silent);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn slow_prefix_gives_up_as_incomplete_keeping_bytes() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"MKCOL /").await.unwrap();
        let d = detect(&mut a, Duration::from_millis(50), Duration::from_millis(100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Opaque, Outcome::Incomplete));
        assert_eq!(&d.buffered[..], b"MKCOL /");
    }

    #[tokio::test]
    async fn stalled_known_method_is_left_to_the_http_codec() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GE").await.unwrap();
        let d = detect(&mut a, Duration::from_millis(50), Duration::from_millis(100)).await.unwrap();
        assert_eq!((d.protocol, d.outcome), (Protocol::Http1, Outcome::Incomplete));
    }
}
