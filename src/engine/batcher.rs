//! Continuous batching: one worker thread owns the forward passes. Requests wait in a bounded
//! queue; between decode steps the worker admits new ones (prefilling each), then runs one
//! batched decode step for every running sequence, each with its own sampling parameters and
//! grammar. A sequence whose receiver is gone (the client disconnected) is dropped at the next
//! step, freeing its KV cache.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::generation::{Generation, Request, Step};
use super::Engine;

/// What a request's receiver gets: steps until one carries a finish reason, or an error.
#[derive(Debug, Clone)]
pub enum Event {
    /// Sent once the prompt is prefilled, before the first token.
    Started,
    Step(Step),
    Error(String),
}

#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a slot; beyond, submissions are refused.
    pub max_queue: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch: 32,
            max_queue: 256,
        }
    }
}

/// Live counters for metrics.
#[derive(Debug, Default)]
pub struct BatcherStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub generated_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

struct Submission {
    request: Request,
    events: UnboundedSender<Event>,
}

struct Active {
    gen: Generation,
    events: UnboundedSender<Event>,
}

/// Handle to the batching worker; dropping every handle stops it once running work is done.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Submission>,
    pub stats: Arc<BatcherStats>,
    pub engine: Arc<Engine>,
}

impl Batcher {
    pub fn spawn(engine: Arc<Engine>, cfg: BatcherConfig) -> Batcher {
        let (tx, rx) = sync_channel(cfg.max_queue.max(1));
        let stats = Arc::new(BatcherStats::default());
        let worker = Worker {
            engine: engine.clone(),
            rx,
            stats: stats.clone(),
            max_batch: cfg.max_batch.max(1),
            running: Vec::new(),
        };
        std::thread::Builder::new()
            .name("phi4-batcher".into())
            .spawn(move || worker.run())
            .expect("spawning the batcher thread");
        Batcher { tx, stats, engine }
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let (events, rx) = unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Submission { request, events }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

struct Worker {
    engine: Arc<Engine>,
    rx: Receiver<Submission>,
    stats: Arc<BatcherStats>,
    max_batch: usize,
    running: Vec<Active>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.running.is_empty() {
                match self.rx.recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => return,
                }
            }
            while self.running.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(s) => self.admit(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if !self.running.is_empty() {
                self.decode_step();
            }
            self.stats
                .running
                .store(self.running.len(), Ordering::SeqCst);
        }
    }

    /// Prefills a new request and samples its first token.
    fn admit(&mut self, s: Submission) {
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        if s.events.is_closed() {
            return;
        }
        let engine = &self.engine;
        let result = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<_> {
            let (mut gen, mut logits) = engine.begin(s.request)?;
            let step = engine.sample_next(&mut gen, &mut logits)?;
            Ok((gen, step))
        }));
        match flatten(result) {
            Ok((gen, step)) => {
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let done = step.finish.is_some();
                let _ = s.events.send(Event::Started);
                if s.events.send(Event::Step(step)).is_ok() && !done {
                    self.running.push(Active {
                        gen,
                        events: s.events,
                    });
                }
            }
            Err(e) => {
                let _ = s.events.send(Event::Error(e));
            }
        }
    }

    /// One batched forward pass for every running sequence, then one sampled token each.
    fn decode_step(&mut self) {
        // Clients that left since the last step are not worth a forward pass.
        self.running.retain(|a| !a.events.is_closed());
        if self.running.is_empty() {
            return;
        }
        let engine = &self.engine;
        let running = &mut self.running;
        let logits = catch_unwind(AssertUnwindSafe(|| {
            let mut gens: Vec<&mut Generation> = running.iter_mut().map(|a| &mut a.gen).collect();
            engine.extend_generations(&mut gens)
        }));
        let logits = match flatten(logits) {
            Ok(l) => l,
            Err(e) => {
                for a in self.running.drain(..) {
                    let _ = a.events.send(Event::Error(e.clone()));
                }
                return;
            }
        };
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        let mut keep = Vec::with_capacity(self.running.len());
        for (mut a, mut l) in self.running.drain(..).zip(logits) {
            let step = catch_unwind(AssertUnwindSafe(|| engine.sample_next(&mut a.gen, &mut l)));
            match flatten(step) {
                Ok(step) => {
                    self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    let done = step.finish.is_some();
                    if a.events.send(Event::Step(step)).is_ok() && !done {
                        keep.push(a);
                    }
                }
                Err(e) => {
                    let _ = a.events.send(Event::Error(e));
                }
            }
        }
        self.running = keep;
    }
}

fn flatten<T>(r: std::thread::Result<anyhow::Result<T>>) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(p) => Err(format!(
            "internal error: {}",
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into())
        )),
    }
}
