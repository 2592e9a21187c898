//! Recovers the destination a client dialled before iptables redirected it to us.
//!
//! This is the proxy's one socket-option module. It needs no `unsafe` of its own:
//! socket2 wraps `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and its IPv6 twin
//! `IP6T_SO_ORIGINAL_DST`, both answered by conntrack for REDIRECTed connections.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The original destination of a redirected connection, or `None` when the client
/// connected to our listener directly (explicit mode).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = canonical(stream.local_addr().ok()?);
    let sock = socket2::SockRef::from(stream);
    let orig = if local.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    // ENOENT (no conntrack entry) means not redirected; so does an entry naming our
    // own listener, which conntrack reports for direct connections.
    let orig = canonical(orig.ok()?.as_socket()?);
    (orig != local).then_some(orig)
}

/// IPv4 clients of a dual-stack socket appear as `::ffff:a.b.c.d`; conntrack speaks IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn direct_connection_is_not_redirected() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&s), None);
    }

    #[test]
    fn mapped_addresses_become_v4() {
        let a: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.1.2.3:80".parse().unwrap());
    }
}
