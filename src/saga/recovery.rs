//! Recovery and ownership (docs/design.md, "Crash recovery and several instances"): the loop
//! that claims unfinished sagas whose lease has expired and resumes them from the log, the
//! heartbeat that renews the leases of the sagas this instance drives, and the two ways an
//! instance stops: killed (leases kept until they expire) or shut down (leases released).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::coordinator::{Engine, Inner};
use super::log;
use crate::db::now_ms;
use crate::metrics::KindLabels;

/// How often the gauges of the log (unfinished and stuck sagas) are read.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Reads the unfinished and stuck sagas of every kind this build knows from the log: the same
/// values on every instance, so they are aggregated with `max`.
async fn refresh_gauges(inner: &Inner) {
    let Some(metrics) = inner.metrics() else { return };
    let counts = match log::unfinished_by_kind(&inner.log).await {
        Ok(counts) => counts,
        Err(error) => {
            tracing::warn!(%error, "could not read the saga gauges");
            return;
        }
    };
    let mut kinds: Vec<&'static str> = inner.definitions.keys().map(|(kind, _)| *kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let (n, stuck) = counts.iter().find(|(k, _, _)| k == kind).map_or((0, 0), |(_, n, s)| (*n, *s));
        metrics.sagas_in_flight.get_or_create(&KindLabels { kind }).set(n);
        metrics.sagas_stuck.get_or_create(&KindLabels { kind }).set(stuck);
    }
}

impl Engine {
    /// Starts the recovery loop and the lease heartbeat. Recovery runs at once, then every
    /// `recovery_interval`.
    pub fn start_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.recovery_interval;
        let recovery = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                if inner.shutdown.is_cancelled() {
                    return;
                }
                let claimed = match (Engine { inner: inner.clone() }).recover_once().await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(%error, "recovery pass failed; retrying next interval");
                        0
                    }
                };
                if claimed > 0 {
                    // A backlog: claim more as soon as there is room, not an interval later.
                    continue;
                }
                let wake = inner.recovery_wake.clone();
                drop(inner);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = wake.notified() => {}
                }
            }
        });
        let weak = Arc::downgrade(&self.inner);
        let beat = self.inner.config.lease / 3;
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(beat).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.shutdown.is_cancelled() {
                    return;
                }
                let until = now_ms() + inner.config.lease.as_millis() as i64;
                let driving: Vec<String> = inner.watchers.lock().unwrap().keys().cloned().collect();
                if let Err(error) = log::renew_leases(&inner.log, &inner.config.instance_id, until, &driving).await {
                    tracing::warn!(%error, "lease heartbeat failed");
                }
            }
        });
        self.inner.background.lock().unwrap().extend([recovery, heartbeat]);
        if self.inner.metrics().is_some() {
            let weak = Arc::downgrade(&self.inner);
            let gauges = tokio::spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.shutdown.is_cancelled() {
                        return;
                    }
                    refresh_gauges(&inner).await;
                    drop(inner);
                    tokio::time::sleep(GAUGE_INTERVAL).await;
                }
            });
            self.inner.background.lock().unwrap().push(gauges);
        }
    }

    /// One recovery pass: claims unfinished sagas whose lease has expired and drives each.
    /// Returns how many it claimed.
    pub async fn recover_once(&self) -> Result<usize, sqlx::Error> {
        let inner = &self.inner;
        let room = inner.config.max_recovering.saturating_sub(inner.recovering.load(Ordering::Relaxed));
        if room == 0 || inner.shutdown.is_cancelled() {
            return Ok(0);
        }
        let now = now_ms();
        let until = now + inner.config.lease.as_millis() as i64;
        let known: Vec<(&str, i64)> = inner.definitions.keys().copied().collect();
        let claimed =
            log::claim_expired(&inner.log, &inner.config.instance_id, now, until, room as i64, &known).await?;
        for (id, generation, kind) in &claimed {
            tracing::info!(saga_id = %id, generation, "resuming saga from the log");
            if let (Some(metrics), Some(kind)) = (inner.metrics(), known.iter().find(|(k, _)| *k == kind.as_str())) {
                metrics.sagas_recovered.get_or_create(&KindLabels { kind: kind.0 }).inc();
            }
            self.spawn_driver(id.clone(), *generation, None, None, true);
        }
        Ok(claimed.len())
    }

    /// Simulates this instance dying: its loops and saga tasks stop at their next step boundary
    /// and its leases are kept, so only their expiry lets another engine resume its sagas.
    pub fn kill(&self) {
        self.inner.shutdown.cancel();
        for handle in self.inner.background.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    /// Stops starting work, lets running steps end within `grace`, then releases this
    /// instance's leases so that another instance (or the next start) resumes at once.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        for handle in inner.background.lock().unwrap().drain(..) {
            handle.abort();
        }
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            tracing::warn!("saga tasks still running after the shutdown grace; their steps resume elsewhere");
        }
        match log::release_leases(&inner.log, &inner.config.instance_id).await {
            Ok(n) => tracing::info!(released = n, "released saga leases"),
            Err(error) => tracing::warn!(%error, "could not release leases; they expire after LEASE_MS"),
        }
    }
}
