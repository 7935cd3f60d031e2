//! The process is stopping: long-lived responses (long polls, event streams,
//! sockets) finish early and tell their clients to reconnect elsewhere.

use std::sync::Arc;

use tokio::sync::watch;

/// Shared by everything of one service process; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(Arc::new(watch::channel(false).0))
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown; every waiter wakes.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    pub fn is_started(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the shutdown has begun (at once if it already has).
    pub async fn started(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in self: the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s).await;
    }
}
