//! A request's end, when the engine has not finished it: its time limit or the drain's.

use std::time::Instant;

use tokio::sync::watch;

use super::AppState;

/// When a request must end though the engine has not finished it: at its time limit
/// (`--request-timeout`) or when the shutdown drain's time is up. Chat and completion choices
/// still open then end with `finish_reason: "length"` and the text so far, speech windows with
/// the text so far; dropping their receivers frees their sequences in the batcher.
#[derive(Clone)]
pub struct Cut {
    at: Option<tokio::time::Instant>,
    end: watch::Receiver<bool>,
}

impl Cut {
    pub fn new(st: &AppState, t0: Instant) -> Cut {
        Cut {
            at: st
                .opts
                .request_timeout
                .map(|d| tokio::time::Instant::from_std(t0) + d),
            end: st.opts.status.requests_must_end(),
        }
    }

    /// Whether the request must end now.
    pub fn is_reached(&self) -> bool {
        *self.end.borrow() || self.at.is_some_and(|t| t <= tokio::time::Instant::now())
    }

    /// Resolves when the request must end.
    pub async fn reached(mut self) {
        let at = self.at;
        let timer = async move {
            match at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let ended = async {
            if self.end.wait_for(|e| *e).await.is_err() {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = timer => {}
            _ = ended => {}
        }
    }
}
