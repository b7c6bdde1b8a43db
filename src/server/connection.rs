//! One client connection: HTTP/1.1 through hyper, with the two timeouts hyper does not keep the
//! way an operator means them. A request's line and headers must arrive within the header
//! timeout of its first byte (hyper's own header timer also runs while a keep-alive connection
//! sits idle, which would tie the two limits together), and a connection with no request in
//! progress is closed after the keep-alive timeout. The request body's limit is the router's
//! (see `read_body` in mod.rs): it answers 408.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tower::ServiceExt;

use super::body::OnDrop;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// Longest wait for the next request on an open connection.
    pub keep_alive_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress since this instant.
    Idle(Instant),
    /// A request's head started arriving at this instant.
    Head(Instant),
    /// This many requests are being answered (their response bodies not yet written).
    Busy(usize),
}

struct Clock {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Clock {
    fn set(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *p = f(*p);
        // notify_one keeps a permit if the watcher is between two waits.
        self.changed.notify_one();
    }

    fn on_bytes_read(&self) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if let Phase::Idle(_) = *p {
            *p = Phase::Head(Instant::now());
            drop(p);
            self.changed.notify_one();
        }
    }

    /// When the current phase runs out, if it can.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        match *self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Idle(t) => Some(t + limits.keep_alive_timeout),
            Phase::Head(t) => Some(t + limits.header_timeout),
            Phase::Busy(_) => None,
        }
    }
}

/// Held by a request from its parsed head until its response body is dropped.
struct InFlight(Arc<Clock>);

impl InFlight {
    fn start(clock: &Arc<Clock>) -> InFlight {
        clock.set(|p| match p {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        });
        InFlight(clock.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(|p| match p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// The socket, telling the clock when bytes come in.
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_bytes_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until the client closes it, a timeout ends it, or a drain lets its
/// last response finish. `app` is asked for the application at each request (the server swaps
/// the loading one for the model's). With `keep_alive` false the connection ends after one
/// response.
pub async fn serve(
    stream: TcpStream,
    app: impl Fn() -> Router + Send + Sync + 'static,
    limits: ConnectionLimits,
    keep_alive: bool,
    mut drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // A new connection is a request about to start: the header clock runs from the connect.
    let clock = Arc::new(Clock {
        phase: Mutex::new(Phase::Head(Instant::now())),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let svc_clock = clock.clone();
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let guard = InFlight::start(&svc_clock);
        let router = app();
        async move {
            let resp = router
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|e: Infallible| match e {});
            Ok::<_, Infallible>(resp.map(|b| OnDrop::wrap(b, guard)))
        }
    });
    let conn = http1::Builder::new()
        .keep_alive(keep_alive)
        .header_read_timeout(None)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = *drain.borrow_and_update();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = clock.deadline(&limits);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = clock.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                // Dropping the connection closes the socket; nothing is being answered.
                if clock.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            r = drain.changed(), if !draining => {
                draining = true;
                let _ = r;
                // Finishes the response in progress, then closes; an idle one closes now.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
