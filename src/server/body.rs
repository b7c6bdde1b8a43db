//! A response body that carries a value until the body is dropped: hyper drops a response body
//! once it has written the last byte (or the client has gone), which is when a request really
//! ends for the connection's idle clock and for the request log, streams included.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};

pub struct OnDrop<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> OnDrop<G> {
    /// `body`, with `guard` dropped right after it.
    pub fn wrap(body: Body, guard: G) -> Body {
        Body::new(OnDrop {
            inner: body,
            _guard: guard,
        })
    }
}

impl<G: Unpin> http_body::Body for OnDrop<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
