//! A small HTTP/1 client for weft's local tools: the readiness and metrics of a local
//! mesh's parts, and the demo apps' calls, either direct or through a sidecar used as
//! `http_proxy` (absolute-form requests, as curl and most HTTP libraries send them).

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Keeps idle keep-alive connections per address and reuses them.
pub struct Client {
    proxy: Option<SocketAddr>,
    idle: Mutex<Vec<(SocketAddr, SendRequest<Full<Bytes>>)>>,
}

impl Client {
    pub fn direct() -> Client {
        Client { proxy: None, idle: Mutex::default() }
    }

    /// Through the HTTP proxy at `proxy`.
    pub fn via(proxy: SocketAddr) -> Client {
        Client { proxy: Some(proxy), idle: Mutex::default() }
    }

    /// Through `http_proxy` (or `HTTP_PROXY`) when it is set, as `weft up` does for its workloads.
    pub fn from_env() -> anyhow::Result<Client> {
        let Some(v) = std::env::var("http_proxy").or_else(|_| std::env::var("HTTP_PROXY")).ok() else {
            return Ok(Client::direct());
        };
        let uri: Uri = v.parse().with_context(|| format!("http_proxy={v:?} is not a URL"))?;
        let addr = uri
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| anyhow!("http_proxy={v:?} must be http://<ip>:<port>"))?;
        Ok(Client::via(addr))
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<Reply> {
        self.request(Method::GET, url, &http::HeaderMap::new(), Bytes::new()).await
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        tokio::time::timeout(TIMEOUT, self.send(method, url, headers, body))
            .await
            .map_err(|_| anyhow!("{url}: no answer within {TIMEOUT:?}"))?
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let uri: Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
        let authority = uri.authority().ok_or_else(|| anyhow!("{url:?} names no host"))?.clone();
        let addr = match self.proxy {
            Some(p) => p,
            None => tokio::net::lookup_host((authority.host(), authority.port_u16().unwrap_or(80)))
                .await?
                .next()
                .ok_or_else(|| anyhow!("{} has no address", authority.host()))?,
        };
        // Through a proxy the request names its destination in absolute form.
        let target = match self.proxy {
            Some(_) => uri.clone(),
            None => uri.path_and_query().map_or("/", |p| p.as_str()).parse()?,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(target)
            .header(header::HOST, authority.as_str())
            .body(Full::new(body))?;
        req.headers_mut().extend(headers.clone());
        let mut sender = match self.checkout(addr) {
            Some(s) => s,
            None => connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?,
        };
        let rsp = sender.send_request(req).await.with_context(|| format!("{url} via {addr}"))?;
        let status = rsp.status().as_u16();
        let body = rsp.into_body().collect().await?.to_bytes();
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((addr, sender));
        Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned() })
    }

    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.retain(|(_, s)| !s.is_closed());
        let i = idle.iter().position(|(a, s)| *a == addr && s.is_ready())?;
        Some(idle.swap_remove(i).1)
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
