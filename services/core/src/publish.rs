//! The publish path: group commit into the store, then the bus.
//!
//! Requests queue on one channel; a few commit workers each take everything
//! queued (up to a limit) and commit it in one transaction. A hot topic is
//! therefore limited by transactions per second times batch size, not by one
//! commit per event. After the commit the events go to the bus; a failed bus
//! publish loses nothing (the event is in the log, and readers fill gaps from
//! it) and is counted in metrics.

use std::{sync::Arc, time::Instant};

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{
    bus::{Bus, TraceHeaders},
    event::{Event, NewEvent, Topic, commit_time},
    metrics::Metrics,
    store::{Appended, Store},
};

/// Why a publish was not acknowledged. Nothing was committed, unless the
/// connection failed during the commit itself: retry with the same
/// idempotency key to be safe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the event log is unavailable: {0}")]
    Store(String),
    #[error("the publisher is shutting down")]
    Closed,
}

/// The result of one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub topic: Topic,
    pub seq: u64,
    /// The idempotency key was seen before: this is the first result.
    pub duplicate: bool,
}

struct Job {
    events: Vec<NewEvent>,
    trace: TraceHeaders,
    reply: oneshot::Sender<Result<Vec<Appended>, PublishError>>,
}

/// A handle to the group committer; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Publisher")
    }
}

struct Worker {
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    max_events: usize,
}

impl Publisher {
    /// Starts `workers` commit workers on a thread of their own (see
    /// [`run_on_commit_thread`]); fails when that thread cannot be started.
    pub fn start(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        workers: usize,
        max_events: usize,
    ) -> std::io::Result<Publisher> {
        let (tx, rx) = mpsc::channel(16 * 1024);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..workers.max(1))
            .map(|_| Worker {
                rx: rx.clone(),
                store: store.clone(),
                bus: bus.clone(),
                metrics: metrics.clone(),
                max_events: max_events.max(1),
            })
            .collect();
        run_on_commit_thread(workers)?;
        Ok(Publisher { tx })
    }

    /// Commits `events` atomically (all or none) and answers once committed.
    pub async fn publish(
        &self,
        events: Vec<NewEvent>,
        trace: TraceHeaders,
    ) -> Result<Vec<Published>, PublishError> {
        let topics: Vec<Topic> = events.iter().map(|e| e.topic.clone()).collect();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                events,
                trace,
                reply,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        let appended = answer.await.map_err(|_| PublishError::Closed)??;
        Ok(topics
            .into_iter()
            .zip(appended)
            .map(|(topic, a)| Published {
                topic,
                seq: a.seq,
                duplicate: a.duplicate,
            })
            .collect())
    }
}

/// Runs the commit workers on a thread and runtime of their own.
///
/// On the main runtime, every step of a commit (taking a connection, the
/// statement's answer, the bus publish) was queued behind the streams the
/// previous event had woken: with 10,000 streams on one topic a publish
/// waited 50-60 ms at the median for its answer (4.4 ms on this thread,
/// docs/benchmarks.md). Here the operating system runs a commit as soon as
/// it can go on.
///
/// The runtime lives as long as the process: database connections the
/// workers open are driven by it, and they go back to the pool that every
/// other task uses.
fn run_on_commit_thread(workers: Vec<Worker>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("rt-commit".into())
        .spawn(move || {
            runtime.block_on(async move {
                for worker in workers {
                    tokio::spawn(worker.run());
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

impl Worker {
    async fn run(self) {
        while let Some(jobs) = self.next_batch().await {
            self.commit(jobs).await;
        }
    }

    /// Waits for one job, then takes whatever else is queued, up to the limit.
    async fn next_batch(&self) -> Option<Vec<Job>> {
        let mut rx = self.rx.lock().await;
        let first = rx.recv().await?;
        let mut count = first.events.len();
        let mut jobs = vec![first];
        while count < self.max_events {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        Some(jobs)
    }

    async fn commit(&self, mut jobs: Vec<Job>) {
        let sizes: Vec<usize> = jobs.iter().map(|j| j.events.len()).collect();
        let events: Vec<NewEvent> = jobs.iter_mut().flat_map(|j| j.events.drain(..)).collect();
        let time = commit_time();
        let started = Instant::now();
        let result = self.store.append(&events, time).await;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let appended = match result {
            Ok(appended) => appended,
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "group commit failed");
                self.metrics.store_errors.inc();
                let err = PublishError::Store(e.to_string());
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        self.metrics
            .commit_batch_events
            .observe(events.len() as f64);

        // Bus first, then the answers: subscribers hear of the events as early
        // as possible, and each job's events go out in seq order.
        let mut events = events.into_iter().zip(appended.iter());
        let mut fresh = 0;
        for (job, size) in jobs.iter().zip(&sizes) {
            for (new, a) in events.by_ref().take(*size) {
                if a.duplicate {
                    continue;
                }
                fresh += 1;
                let event = Event {
                    topic: new.topic,
                    seq: a.seq,
                    event_type: new.event_type,
                    data: new.data,
                    time,
                };
                if let Err(e) = self.bus.publish(&event, &job.trace).await {
                    self.metrics.bus_publish_errors.inc();
                    tracing::warn!(topic = %event.topic, seq = event.seq, error = %e, "bus publish failed; readers will fill in from the log");
                }
            }
        }
        self.metrics.events_committed.inc_by(fresh);

        let mut appended = appended.into_iter();
        for (job, size) in jobs.into_iter().zip(sizes) {
            let _ = job.reply.send(Ok(appended.by_ref().take(size).collect()));
        }
    }
}
