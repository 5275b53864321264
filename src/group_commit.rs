//! Group commit for SQLite's single writer: units of work from concurrent callers run in one
//! transaction, each inside its own savepoint, so that one commit (one fsync) covers many of
//! them and one unit's failure undoes only that unit.
//!
//! PostgreSQL does not need it: its server already groups concurrent commits into shared WAL
//! flushes, and there a savepoint would cost a round trip.

use std::future::Future;
use std::pin::Pin;

use sqlx::{AnyConnection, AnyPool, Connection};
use tokio::sync::{mpsc, oneshot};

/// Most units in one transaction.
const MAX_GROUP: usize = 128;

/// A boxed future borrowing the group's connection.
pub type UnitFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A unit as the loop sees it: it runs on the connection and says whether to keep its effects.
type Work = Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> UnitFuture<'c, bool> + Send>;

struct Unit {
    work: Work,
    /// Told whether the group committed (and if not, why); until then the unit's effects are
    /// not durable.
    committed: oneshot::Sender<Result<(), String>>,
}

/// Hands units of work to the task that groups them; cheap to clone.
#[derive(Clone, Debug)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Unit>,
}

impl GroupCommit {
    /// Starts the task that runs units in groups on connections from `pool`. It stops when every
    /// handle is dropped.
    pub fn start(pool: AnyPool) -> Self {
        let (queue, mut rx) = mpsc::unbounded_channel::<Unit>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(unit) => group.push(unit),
                        Err(_) => break,
                    }
                }
                // Its own task, so that a unit that panics fails its group, not every later one.
                let _ = tokio::spawn(run_group(pool.clone(), group)).await;
            }
        });
        Self { queue }
    }

    /// Runs `work` inside a savepoint of the next group's transaction and returns its result
    /// once that transaction has committed. An `Err` from `work` rolls back its savepoint only.
    /// If the group does not commit, nothing of it is durable and the error is an I/O error (a
    /// commit of a local file fails only on I/O), or `WorkerCrashed` if the group's task died;
    /// both are transient.
    pub async fn run<T, E, F>(&self, work: F) -> Result<Result<T, E>, sqlx::Error>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> UnitFuture<'c, Result<T, E>> + Send + 'static,
    {
        let (result_tx, result_rx) = oneshot::channel();
        let (committed_tx, committed_rx) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            Box::pin(async move {
                let result = work(conn).await;
                let keep = result.is_ok();
                let _ = result_tx.send(result);
                keep
            })
        });
        self.queue.send(Unit { work, committed: committed_tx }).map_err(|_| sqlx::Error::WorkerCrashed)?;
        match committed_rx.await {
            Ok(Ok(())) => result_rx.await.map_err(|_| sqlx::Error::WorkerCrashed),
            Ok(Err(error)) => Err(sqlx::Error::Io(std::io::Error::other(format!("group commit failed: {error}")))),
            Err(_) => Err(sqlx::Error::WorkerCrashed),
        }
    }
}

/// Runs one group: BEGIN, each unit in a savepoint, COMMIT; then tells every unit the outcome.
async fn run_group(pool: AnyPool, group: Vec<Unit>) {
    let (works, waiting): (Vec<Work>, Vec<_>) = group.into_iter().map(|u| (u.work, u.committed)).unzip();
    let committed = async {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        for work in works {
            let mut savepoint = tx.begin().await?;
            if work(&mut savepoint).await {
                savepoint.commit().await?;
            } else {
                savepoint.rollback().await?;
            }
        }
        tx.commit().await
    }
    .await
    .map_err(|error: sqlx::Error| error.to_string());
    if let Err(error) = &committed {
        tracing::warn!(%error, units = waiting.len(), "group transaction failed; none of its units took effect");
    }
    for unit in waiting {
        let _ = unit.send(committed.clone());
    }
}
