//! Counting long-lived connections against a per-process maximum.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::ApiError;

/// Open connections of one kind (SSE streams, WebSockets) in this process,
/// against that kind's maximum.
#[derive(Debug)]
pub struct Gate {
    open: AtomicUsize,
    max: usize,
    /// What is counted, for the refusal's message ("streams", "WebSockets").
    what: &'static str,
}

/// One admitted connection; dropping it frees the place.
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Gate {
    pub fn new(max: usize, what: &'static str) -> Arc<Gate> {
        Arc::new(Gate {
            open: AtomicUsize::new(0),
            max,
            what,
        })
    }

    /// Admits one more connection unless the maximum are open.
    pub fn try_enter(self: &Arc<Self>) -> Option<Pass> {
        let max = self.max;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Pass(self.clone()))
    }

    /// Like [`Gate::try_enter`], refusing with `503 too_many_connections`
    /// (and `Retry-After`) when the maximum are open.
    pub fn enter(self: &Arc<Self>) -> Result<Pass, ApiError> {
        self.try_enter().ok_or_else(|| {
            ApiError::unavailable(
                "too_many_connections",
                format!(
                    "this server already holds its maximum of {} {}; retry later",
                    self.max, self.what
                ),
                anyhow::anyhow!("{} limit of {} reached", self.what, self.max),
            )
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_maximum_and_frees_places_on_drop() {
        let gate = Gate::new(2, "streams");
        let a = gate.try_enter().unwrap();
        let _b = gate.enter().unwrap();
        assert!(gate.try_enter().is_none());
        assert_eq!(gate.enter().unwrap_err().code(), "too_many_connections");
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.try_enter().is_some());
    }
}
