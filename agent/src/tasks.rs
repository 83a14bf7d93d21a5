//! The daemon's long-running tasks, named: an unexpected end is logged with the subsystem's
//! name, and shutdown stops every one and waits for it (nothing is left detached).

use std::future::Future;

use tokio::task::JoinSet;

/// A set of named subsystem tasks.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<&'static str>,
}

impl Tasks {
    /// An empty set.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `task` as subsystem `name`.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(async move {
            task.await;
            name
        });
    }

    /// How many are still running.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when none is running.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Waits for the next task to end and says which (or how it died); `None` when none is left.
    pub async fn next_ended(&mut self) -> Option<Result<&'static str, String>> {
        let done = self.set.join_next().await?;
        Some(done.map_err(|e| e.to_string()))
    }

    /// Stops every task at its next await point and waits until all have ended. Their work is
    /// journaled before it is acknowledged, so what a stopped task was doing resumes on the
    /// next start.
    pub async fn shutdown(&mut self) {
        self.set.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_task_is_named_and_shutdown_stops_the_rest() {
        let mut tasks = Tasks::new();
        tasks.spawn("quick", async {});
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("forever", async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        assert_eq!(tasks.next_ended().await, Some(Ok("quick")));
        assert_eq!(tasks.len(), 1);
        tasks.shutdown().await;
        assert!(tasks.is_empty());
        // The stopped task was dropped, so its sender is gone.
        assert!(rx.await.is_err());
    }
}
