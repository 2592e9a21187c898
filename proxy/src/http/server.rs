//! Serves one client connection already known to be HTTP/1 or HTTP/2.
//!
//! hyper does the parsing; here are its limits (header size and read timeout, HTTP/2
//! stream and reset limits against stream floods and rapid reset) and what happens to
//! a connection when hyper gives up on it or the proxy drains.

use std::sync::Arc;

use hyper::{server::conn, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::keepalive::{Activity, Done, ReadWatch};
use super::{
    first_head::{FirstHead, FirstHeadWatch},
    frames::{Continuations, FrameWatch},
    service::{self, Conn, Forward},
};
use crate::{body::Watched, config::HttpConfig, drain, errors::Cause};

/// Concurrently-reset streams a client may leave for us to clean up before the
/// connection is closed with ENHANCE_YOUR_CALM (the rapid-reset attack, CVE-2023-44487).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams we may reset because of client errors before closing the connection.
const H2_MAX_LOCAL_RESETS: usize = 1024;

pub async fn serve<I, F>(io: I, ctx: Conn<F::Meta>, fwd: Arc<F>, cfg: &HttpConfig, drain: drain::Watch)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Forward,
{
    let mut ctx = ctx;
    ctx.drain = Some(drain.clone());
    let first_head = Arc::new(FirstHead::default());
    if ctx.protocol == "http1" {
        ctx.first_head = Some(first_head.clone());
    }
    let ctx = Arc::new(ctx);
    let dir = fwd.common().dir;
    let protocol = ctx.protocol;
    let metrics = fwd.common().metrics.clone();
    if protocol == "h2" {
        let svc = {
            let ctx = ctx.clone();
            // Boxed: hyper keeps room for the service's future in every connection, in
            // use or idle, and a request's future is tens of KiB.
            service_fn(move |req| Box::pin(service::handle(fwd.clone(), req, ctx.clone())))
        };
        let continuations = Arc::new(Continuations::default());
        let io = FrameWatch::new(io, continuations.clone());
        let mut conn = conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            .serve_connection(TokioIo::new(io), svc);
        let res = tokio::select! {
            res = &mut conn => res,
            _ = drain.signaled() => {
                std::pin::Pin::new(&mut conn).graceful_shutdown();
                conn.await
            }
            _ = ctx.resets.abusive.notified() => {
                // Dropping the connection closes it at once; a GOAWAY would let the
                // client keep the server busy until its streams finish.
                let why = format_args!("HTTP/2 client {} cancels most of its requests", ctx.client);
                return metrics.closed(dir, Cause::RapidReset, why);
            }
        };
        if let Err(e) = res {
            // h2 itself sends GOAWAY(ENHANCE_YOUR_CALM) when too many streams are reset
            // before they were accepted (the same attack, caught earlier), or when a header
            // block comes in more CONTINUATION frames than its size allows (a flood).
            let calm = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .filter(|h2| h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM));
            if let Some(h2) = calm {
                // h2 sends no more than this many in a row of its own (its limit is at least 5).
                let (cause, what) = match continuations.most_in_a_row() >= 5 {
                    true => (Cause::ContinuationFlood, "sent a header block in too many CONTINUATION frames"),
                    false => (Cause::RapidReset, "reset too many streams before they were accepted"),
                };
                let _ = h2;
                metrics.closed(dir, cause, format_args!("HTTP/2 client {} {what}", ctx.client));
            } else {
                tracing::debug!(client = %ctx.client, "HTTP/2 connection ended: {e}");
            }
        }
        return;
    }

    let activity = Arc::new(Activity::default());
    let svc = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        service_fn(move |req| {
            activity.request_started();
            // Boxed where it is made, as above (an idle keep-alive connection holds only
            // a pointer), and before the wrapper moves it: its 7–8 KiB are copied once.
            let answer = Box::pin(service::handle(fwd.clone(), req, ctx.clone()));
            let done = Done(activity.clone());
            Box::pin(
                async move { answer.await.map(|rsp| rsp.map(|b| crate::body::boxed(Watched::new(b, done)))) },
            )
        })
    };
    let io = FirstHeadWatch::new(io, cfg.max_header_bytes.saturating_mul(2), first_head);
    let io = ReadWatch::new(io, activity.clone());
    // hyper's timer runs from the end of a response to the end of the next head: it is
    // the keep-alive idle timeout here; a head's own deadline is `activity`'s.
    // Oversize heads past the proxy's own check (which answers with `weft-error`) are cut
    // off by hyper's hard limit at twice the setting, so memory stays bounded.
    let mut conn = conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.keepalive_idle_timeout)
        .max_header_size(cfg.max_header_bytes.saturating_mul(2))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    // `None`: a head that began did not arrive in time.
    let res = tokio::select! {
        res = &mut conn => Some(res),
        _ = drain.signaled() => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            Some((&mut conn).await)
        }
        _ = activity.head_timed_out(cfg.header_read_timeout) => None,
    };
    // hyper answers parse errors itself (400, 414, 431), without `weft-error` (hyper has no
    // hook for it); the cause and its true status are recorded here.
    let (cause, e) = match res {
        Some(Ok(())) => return,
        None => {
            (Cause::HeaderTimeout, format!("no complete request head within {:?}", cfg.header_read_timeout))
        }
        Some(Err(e)) if e.is_timeout() => (Cause::HeaderTimeout, e.to_string()),
        Some(Err(e)) if e.is_parse_too_large() && e.to_string().contains("URI too long") => {
            (Cause::UriTooLong, e.to_string())
        }
        Some(Err(e)) if e.is_parse_too_large() => (Cause::HeaderTooLarge, e.to_string()),
        Some(Err(e)) if e.is_parse() => (Cause::BadRequest, e.to_string()),
        Some(Err(e)) => {
            tracing::debug!(client = %ctx.client, "HTTP/1 connection ended: {e}");
            return;
        }
    };
    if cause == Cause::HeaderTimeout {
        // A client that sent part of a head gets a 408; a connection with nothing buffered
        // (idle, or silent since it connected) is just closed.
        let Some(parts) = conn.into_parts() else { return };
        if parts.read_buf.is_empty() {
            return tracing::debug!(client = %ctx.client, "closed a connection without a request: {e}");
        }
        tracing::info!(direction = dir.as_str(), client = %ctx.client, cause = cause.as_str(), "rejected request: {e}");
        let mut io = parts.io.into_inner();
        let _ = io.write_all(crate::errors::respond_raw_http1(cause).as_bytes()).await;
        let _ = io.shutdown().await;
    } else {
        tracing::info!(direction = dir.as_str(), client = %ctx.client, cause = cause.as_str(), "rejected request: {e}");
    }
    metrics.response(dir, protocol, cause.status().as_u16(), Some(cause), Default::default(), 0.0);
}
