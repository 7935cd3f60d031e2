//! Counting long-lived connections against a per-process maximum.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Open connections of one kind (SSE streams, WebSockets) in this process.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicUsize,
}

/// One admitted connection; dropping it frees the place.
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Gate {
    /// Admits one more connection unless `max` are open.
    pub fn try_enter(self: &Arc<Self>, max: usize) -> Option<Pass> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Pass(self.clone()))
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
        let gate = Arc::new(Gate::default());
        let a = gate.try_enter(2).unwrap();
        let _b = gate.try_enter(2).unwrap();
        assert!(gate.try_enter(2).is_none());
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.try_enter(2).is_some());
    }
}
