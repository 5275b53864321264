//! Live progress: one poller per instance reads the saga log and feeds every open stream, the
//! per-order streams of `GET /orders/{id}/events` and the global feed of `GET /sagas/events`
//! (docs/design.md, "Live progress"). Everything comes from the database, so a stream sees the
//! sagas other instances run; streams hold no connection of their own and poll nothing.
//!
//! - An order's stream resumes from an [`OrderCursor`]: the count of events delivered per saga
//!   of the order, built from the `(saga_id, seq)` pairs, which are gap-free and in commit order
//!   per saga, unlike any clock or database sequence.
//! - The poller runs only while there are subscribers, every [`POLL_INTERVAL`]. A subscriber's
//!   channel is bounded: an order stream that is full is resent from its cursor on a later poll,
//!   a feed subscriber that is full is closed (it reconnects and gets a fresh snapshot).

pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::db::{Db, now_ms};
use crate::error::{Error, Result};
use crate::limits::{CURSOR_COUNT_DIGITS, MAX_CANCEL_SAGAS, MAX_SAGAS_PER_ORDER};
use crate::metrics::{Metrics, StreamLabels};
use crate::orders::{Order, cancel_order, store as order_store};
use crate::saga::{Event, EventKind, log};
pub use store::SagaSummary;

/// How often the poller reads the log while anyone is subscribed.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How far behind the newest saga id seen (or this instance's clock, if earlier) the global feed
/// looks for new sagas: the clock skew between instances plus the delay between an id's minting
/// and its commit that the feed tolerates for a saga that starts and finishes between two polls.
pub const CREATION_OVERLAP: Duration = Duration::from_secs(10);
/// Most sagas one poll statement names (each is a key range of `saga_events`).
const SAGAS_PER_QUERY: usize = 100;
/// Updates queued per order stream before the poller stops sending it more on this poll.
const ORDER_CAPACITY: usize = 64;
/// Updates queued per feed subscriber before it is closed as too slow.
const FEED_CAPACITY: usize = 4096;

/// Where an order's stream stands: for each of the order's sagas in the order they were created
/// (its place_order saga, then its cancel_order sagas: usually one, more when an aborted cancel
/// was replaced), how many of its events (from seq 0) were delivered. Written `p`, `p.c`,
/// `p.c.c2`... (decimal), as the `id:` of each `saga` event and read back from `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OrderCursor(pub Vec<i64>);

impl OrderCursor {
    /// Parses a `Last-Event-ID`: non-negative decimal counts separated by `.`, one per saga.
    pub fn parse(text: &str) -> Option<OrderCursor> {
        let parts: Vec<&str> = text.split('.').collect();
        if parts.is_empty() || parts.len() > MAX_SAGAS_PER_ORDER {
            return None;
        }
        let counts = parts
            .iter()
            .map(|p| {
                let digits = !p.is_empty() && p.len() <= CURSOR_COUNT_DIGITS && p.bytes().all(|b| b.is_ascii_digit());
                digits.then(|| p.parse::<i64>().ok()).flatten()
            })
            .collect::<Option<Vec<i64>>>()?;
        Some(OrderCursor(counts))
    }
}

impl std::fmt::Display for OrderCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(i64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// One history event of one of the order's sagas, with the cursor that resumes after it.
#[derive(Debug, Clone)]
pub struct SagaStep {
    /// The saga.
    pub saga_id: String,
    /// Its kind.
    pub kind: String,
    /// The event.
    pub event: Event,
    /// The stream's cursor once this event is delivered.
    pub cursor: OrderCursor,
}

/// What an order's stream receives from the poller.
#[derive(Debug, Clone)]
pub enum OrderUpdate {
    /// The next event of one of the order's sagas.
    Saga(SagaStep),
    /// Every saga of the order has settled and all their events were sent: the order as it now
    /// stands, the stream's last update.
    Settled(Order),
}

/// The live-progress hub of one instance: the registrations and the poller that feeds them.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    registry: Mutex<Registry>,
    /// Wakes the idle poller when a subscriber comes (shared with the poller task, which holds
    /// the hub itself only while it polls).
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    queries: AtomicU64,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    orders: HashMap<u64, OrderSub>,
    feeds: HashMap<u64, FeedSub>,
}

impl Registry {
    fn is_empty(&self) -> bool {
        self.orders.is_empty() && self.feeds.is_empty()
    }
}

struct OrderSub {
    order_id: String,
    /// The place_order saga, then the cancel_order saga once the order has one.
    sagas: Vec<Watched>,
    tx: mpsc::Sender<OrderUpdate>,
}

impl OrderSub {
    fn cursor(&self) -> OrderCursor {
        OrderCursor(self.sagas.iter().map(|s| s.next).collect())
    }
}

struct Watched {
    id: String,
    kind: String,
    /// The seq of the next event to deliver.
    next: i64,
    /// The saga's `next_seq` once it is known to be final.
    final_at: Option<i64>,
}

impl Watched {
    fn done(&self) -> bool {
        self.final_at.is_some_and(|end| self.next >= end)
    }
}

struct FeedSub {
    tx: mpsc::Sender<SagaSummary>,
    /// Not yet sent its snapshot.
    fresh: bool,
}

/// The global feed's view of the log between polls, kept only while it has subscribers.
#[derive(Default)]
struct FeedState {
    /// The (id, next_seq) last seen of each unfinished or recently created saga.
    known: HashMap<String, i64>,
    /// The ids of the sagas unfinished at the last poll.
    unfinished: HashSet<String>,
    /// The time (ms) in the newest saga id seen.
    newest: Option<i64>,
}

/// A registration: removed from the hub when dropped (the stream ended or its client left).
struct Registration {
    inner: Arc<Inner>,
    id: u64,
    feed: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = self.inner.registry.lock().unwrap();
        if self.feed {
            registry.feeds.remove(&self.id);
        } else {
            registry.orders.remove(&self.id);
        }
        let (orders, feeds) = (registry.orders.len(), registry.feeds.len());
        drop(registry);
        self.inner.gauge(orders, feeds);
    }
}

/// An open order stream: the order as it stood when the stream opened, then its updates.
pub struct OrderWatch {
    /// The order as read when the stream opened.
    pub order: Order,
    rx: mpsc::Receiver<OrderUpdate>,
    _registration: Registration,
}

impl OrderWatch {
    /// The next update; `None` once the stream is over (after [`OrderUpdate::Settled`], or when
    /// the instance shuts down).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<OrderUpdate>> {
        self.rx.poll_recv(cx)
    }
}

/// An open global feed: every saga change, after a snapshot of the unfinished and recently
/// created sagas.
pub struct FeedWatch {
    rx: mpsc::Receiver<SagaSummary>,
    _registration: Registration,
}

impl FeedWatch {
    /// The next saga change; `None` when the feed was closed (too slow, or shutting down).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<SagaSummary>> {
        self.rx.poll_recv(cx)
    }
}

impl Live {
    /// The hub over the log database `db`, with its poller task (idle until a subscriber comes).
    pub fn start(db: Db, metrics: Option<Arc<Metrics>>) -> Live {
        let inner = Arc::new(Inner {
            db,
            registry: Mutex::new(Registry::default()),
            wake: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
            metrics,
            queries: AtomicU64::new(0),
        });
        // The task holds only a weak reference, so that dropping the last `Live` ends it.
        let weak = Arc::downgrade(&inner);
        let (wake, shutdown) = (inner.wake.clone(), inner.shutdown.clone());
        tokio::spawn(async move { poller(weak, wake, shutdown).await });
        Live { inner }
    }

    /// Ends every stream and the poller: the instance is shutting down.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let mut registry = self.inner.registry.lock().unwrap();
        registry.orders.clear();
        registry.feeds.clear();
    }

    /// Statements the poller has run since the start.
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// Opens an order's stream, resuming after `last_event_id` if given. Errors: the cursor is
    /// malformed or not one of this order's ([`Error::InvalidLastEventId`]); no such order.
    pub async fn watch_order(&self, order_id: &str, last_event_id: Option<&str>) -> Result<OrderWatch> {
        let cursor = match last_event_id {
            // Not repeated back: the header may be anything up to the HTTP layer's limit.
            Some(text) => Some(OrderCursor::parse(text).ok_or_else(|| {
                Error::InvalidLastEventId("not a cursor of this stream (such as \"7\" or \"11.2\")".into())
            })?),
            None => None,
        };
        let db = &self.inner.db;
        let order =
            order_store::get(db, order_id).await?.ok_or_else(|| Error::NotFound(format!("order {order_id:?}")))?;
        // The order's sagas in the order they were created: its place_order saga, then its
        // cancel sagas, each (after an abort) replacing the one before, followed back from the
        // newest.
        let mut records = Vec::new();
        let mut next = order.cancel_saga_id.clone();
        while let Some(id) = next.take() {
            let saga =
                log::get(db, &id).await?.ok_or_else(|| Error::Internal(format!("order without its saga {id}")))?;
            next = saga.input.get("replaces").and_then(|r| r.as_str()).map(str::to_string);
            records.push(saga);
            if records.len() > MAX_CANCEL_SAGAS {
                // The cancel endpoint refuses one more than this: a broken invariant.
                return Err(Error::Internal(format!("order {order_id} has too many cancel sagas")));
            }
        }
        let place = log::get(db, &order.saga_id)
            .await?
            .ok_or_else(|| Error::Internal(format!("order without its saga {}", order.saga_id)))?;
        records.push(place);
        let mut sagas = Vec::new();
        for saga in records.into_iter().rev() {
            let final_at = saga.state.is_final().then_some(saga.next_seq);
            sagas.push((Watched { id: saga.id, kind: saga.kind, next: 0, final_at }, saga.next_seq));
        }
        if let Some(cursor) = &cursor {
            let fits = cursor.0.len() <= sagas.len() && cursor.0.iter().zip(&sagas).all(|(n, (_, end))| n <= end);
            if !fits {
                return Err(Error::InvalidLastEventId(format!("{cursor} is past the history of order {order_id}")));
            }
            for (n, (watched, _)) in cursor.0.iter().zip(&mut sagas) {
                watched.next = *n;
            }
        }
        let (tx, rx) = mpsc::channel(ORDER_CAPACITY);
        let sub = OrderSub { order_id: order.id.clone(), sagas: sagas.into_iter().map(|(w, _)| w).collect(), tx };
        let id = self.register(|registry, id| {
            registry.orders.insert(id, sub);
        });
        Ok(OrderWatch { order, rx, _registration: Registration { inner: self.inner.clone(), id, feed: false } })
    }

    /// Opens the global feed.
    pub fn watch_sagas(&self) -> FeedWatch {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let id = self.register(|registry, id| {
            registry.feeds.insert(id, FeedSub { tx, fresh: true });
        });
        FeedWatch { rx, _registration: Registration { inner: self.inner.clone(), id, feed: true } }
    }

    fn register(&self, add: impl FnOnce(&mut Registry, u64)) -> u64 {
        let mut registry = self.inner.registry.lock().unwrap();
        registry.next_id += 1;
        let id = registry.next_id;
        add(&mut registry, id);
        let (orders, feeds) = (registry.orders.len(), registry.feeds.len());
        drop(registry);
        self.inner.gauge(orders, feeds);
        self.inner.wake.notify_one();
        id
    }
}

impl Drop for Inner {
    /// The last handle is gone: the poller ends.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Inner {
    fn gauge(&self, orders: usize, feeds: usize) {
        if let Some(metrics) = &self.metrics {
            metrics.live_subscribers.get_or_create(&StreamLabels { stream: "order" }).set(orders as i64);
            metrics.live_subscribers.get_or_create(&StreamLabels { stream: "feed" }).set(feeds as i64);
        }
    }

    fn counted(&self, n: u64) {
        self.queries.fetch_add(n, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.live_poll_queries.inc_by(n);
        }
    }
}

/// The poller: sleeps while nobody is subscribed, else polls every [`POLL_INTERVAL`].
async fn poller(weak: std::sync::Weak<Inner>, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut feed: Option<FeedState> = None;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (idle, no_feed) = {
            let registry = inner.registry.lock().unwrap();
            (registry.is_empty(), registry.feeds.is_empty())
        };
        if no_feed {
            feed = None;
        }
        if idle {
            drop(inner);
            let notified = wake.notified();
            tokio::select! {
                () = notified => continue,
                () = shutdown.cancelled() => return,
            }
        }
        if let Err(error) = poll_orders(&inner).await {
            tracing::warn!(%error, "live progress: could not poll the order streams");
        }
        if !no_feed {
            let state = feed.get_or_insert_with(FeedState::default);
            if let Err(error) = poll_feed(&inner, state).await {
                tracing::warn!(%error, "live progress: could not poll the saga feed");
            }
        }
        drop(inner);
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// One poll for the order streams: the new events of every watched saga (from the lowest cursor
/// of its subscribers), then the watched orders' rows, read after the events so that a cancel
/// saga attached before a place saga's end was seen is found before its stream closes.
async fn poll_orders(inner: &Inner) -> Result<(), sqlx::Error> {
    let (subs, from, order_ids) = {
        let registry = inner.registry.lock().unwrap();
        let mut from: BTreeMap<String, i64> = BTreeMap::new();
        let mut order_ids: Vec<String> = Vec::new();
        for sub in registry.orders.values() {
            order_ids.push(sub.order_id.clone());
            for saga in sub.sagas.iter().filter(|s| !s.done()) {
                from.entry(saga.id.clone()).and_modify(|n| *n = (*n).min(saga.next)).or_insert(saga.next);
            }
        }
        order_ids.sort();
        order_ids.dedup();
        (registry.orders.keys().copied().collect::<HashSet<u64>>(), from, order_ids)
    };
    if subs.is_empty() {
        return Ok(());
    }
    let ranges: Vec<(&str, i64)> = from.iter().map(|(id, n)| (id.as_str(), *n)).collect();
    let mut events: HashMap<String, Vec<Event>> = HashMap::new();
    for chunk in ranges.chunks(SAGAS_PER_QUERY) {
        inner.counted(1);
        for (saga_id, event) in store::events_since(&inner.db, chunk).await? {
            events.entry(saga_id).or_default().push(event);
        }
    }
    let mut orders: HashMap<String, Order> = HashMap::new();
    let ids: Vec<&str> = order_ids.iter().map(String::as_str).collect();
    for chunk in ids.chunks(SAGAS_PER_QUERY) {
        inner.counted(1);
        orders.extend(order_store::get_many(&inner.db, chunk).await?.into_iter().map(|o| (o.id.clone(), o)));
    }
    let mut registry = inner.registry.lock().unwrap();
    let mut ended = Vec::new();
    for (id, sub) in registry.orders.iter_mut().filter(|(id, _)| subs.contains(id)) {
        if !deliver(sub, &events) {
            ended.push(*id);
            continue;
        }
        let Some(order) = orders.get(&sub.order_id) else { continue };
        if let Some(cancel) = &order.cancel_saga_id {
            if !sub.sagas.iter().any(|s| &s.id == cancel) {
                // Found after this poll's events were read: its events come with the next poll.
                sub.sagas.push(Watched {
                    id: cancel.clone(),
                    kind: cancel_order::KIND.name.into(),
                    next: 0,
                    final_at: None,
                });
                continue;
            }
        }
        if sub.sagas.iter().all(Watched::done) {
            match sub.tx.try_send(OrderUpdate::Settled(order.clone())) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => ended.push(*id),
                Err(mpsc::error::TrySendError::Full(_)) => {}
            }
        }
    }
    for id in ended {
        registry.orders.remove(&id);
    }
    Ok(())
}

/// Sends `sub` the events of its sagas it has not had, in seq order, advancing its cursor by
/// each one sent; stops at a full channel (the rest goes with a later poll, from the cursor).
/// False when the stream's receiver is gone.
fn deliver(sub: &mut OrderSub, events: &HashMap<String, Vec<Event>>) -> bool {
    for i in 0..sub.sagas.len() {
        let Some(list) = events.get(&sub.sagas[i].id) else { continue };
        for event in list {
            let saga = &sub.sagas[i];
            if event.seq < saga.next {
                continue;
            }
            if event.seq > saga.next {
                // Never happens: seqs are gap-free and read from the lowest cursor. Resend later.
                break;
            }
            let final_event =
                event.step.is_none() && matches!(event.kind, EventKind::Completed | EventKind::Compensated);
            let mut cursor = sub.cursor();
            cursor.0[i] = event.seq + 1;
            let step = SagaStep { saga_id: saga.id.clone(), kind: saga.kind.clone(), event: event.clone(), cursor };
            match sub.tx.try_send(OrderUpdate::Saga(step)) {
                Ok(()) => {
                    let saga = &mut sub.sagas[i];
                    saga.next = event.seq + 1;
                    if final_event {
                        saga.final_at = Some(saga.next);
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
    }
    true
}

/// One poll for the global feed: the unfinished sagas' (id, next_seq) and those of the sagas
/// created since [`CREATION_OVERLAP`] before the newest id seen (or before this instance's
/// clock, if earlier); a saga that left the unfinished set is read once by id. Whatever is new
/// or has a new `next_seq` is read in full and sent; fresh subscribers get every known saga.
async fn poll_feed(inner: &Inner, state: &mut FeedState) -> Result<(), sqlx::Error> {
    let fresh = inner.registry.lock().unwrap().feeds.values().any(|f| f.fresh);
    inner.counted(2);
    let unfinished = store::unfinished(&inner.db).await?;
    let overlap = CREATION_OVERLAP.as_millis() as i64;
    let floor = state.newest.unwrap_or(i64::MAX).min(now_ms()) - overlap;
    let recent = store::created_since(&inner.db, &uuid_floor(floor)).await?;
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    for (id, next_seq) in unfinished.iter().chain(&recent) {
        if let Some(time) = uuid_time(id) {
            state.newest = Some(state.newest.map_or(time, |n| n.max(time)));
        }
        seen.insert(id.clone(), *next_seq);
    }
    let left: Vec<String> = state.unfinished.iter().filter(|id| !seen.contains_key(*id)).cloned().collect();
    let changed: Vec<&str> =
        seen.iter().filter(|(id, n)| state.known.get(*id) != Some(n)).map(|(id, _)| id.as_str()).collect();
    let mut wanted: Vec<&str> = if fresh { seen.keys().map(String::as_str).collect() } else { changed };
    wanted.extend(left.iter().map(String::as_str));
    let mut summaries = Vec::new();
    for chunk in wanted.chunks(SAGAS_PER_QUERY) {
        inner.counted(1);
        summaries.extend(store::summaries(&inner.db, chunk).await?);
    }
    // A summary is read after the list, so it may be newer than the list said: judge what is
    // news, and remember what was sent, by the summary itself, or the next poll would see the
    // list catch up and send the same summary again.
    let news: Vec<&SagaSummary> = summaries.iter().filter(|s| state.known.get(&s.id) != Some(&s.next_seq)).collect();
    for summary in &summaries {
        if let Some(next_seq) = seen.get_mut(&summary.id) {
            *next_seq = summary.next_seq;
        }
    }
    {
        let mut registry = inner.registry.lock().unwrap();
        registry.feeds.retain(|_, sub| {
            if sub.fresh && !fresh {
                // Came after this poll began: its snapshot comes with the next one.
                return true;
            }
            let batch: Vec<&SagaSummary> = if sub.fresh { summaries.iter().collect() } else { news.clone() };
            sub.fresh = false;
            batch.into_iter().all(|s| sub.tx.try_send(s.clone()).is_ok())
        });
    }
    state.unfinished = unfinished.into_iter().map(|(id, _)| id).collect();
    state.known = seen.into_iter().collect();
    Ok(())
}

/// The time (ms) a UUIDv7 was minted at, from its first 48 bits; `None` for another id.
fn uuid_time(id: &str) -> Option<i64> {
    let hex: String = id.get(0..8)?.chars().chain(id.get(9..13)?.chars()).collect();
    (id.len() == 36 && id.as_bytes().get(14) == Some(&b'7')).then(|| i64::from_str_radix(&hex, 16).ok()).flatten()
}

/// The lowest UUIDv7 text of time `ms`: every id minted at `ms` or later sorts at or above it.
fn uuid_floor(ms: i64) -> String {
    let ms = ms.max(0);
    format!("{:08x}-{:04x}-0000-0000-000000000000", ms >> 16, ms & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_parse_and_print_back() {
        assert_eq!(OrderCursor::parse("7"), Some(OrderCursor(vec![7])));
        assert_eq!(OrderCursor::parse("11.2"), Some(OrderCursor(vec![11, 2])));
        assert_eq!(OrderCursor(vec![11, 2]).to_string(), "11.2");
        assert_eq!(OrderCursor::parse("11.2.5"), Some(OrderCursor(vec![11, 2, 5])), "a replaced cancel");
        let too_many = vec!["1"; MAX_SAGAS_PER_ORDER + 1].join(".");
        assert_eq!(OrderCursor::parse(&too_many), None);
        for bad in ["", ".", "1.", ".1", "1..3", "-1", "+1", "1e3", "a", " 1", "1234567890123456"] {
            assert_eq!(OrderCursor::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn uuid_times_round_trip_through_the_floor() {
        let id = uuid::Uuid::now_v7().to_string();
        let time = uuid_time(&id).unwrap();
        assert!((time - now_ms()).abs() < 60_000, "{id} -> {time}");
        assert!(uuid_floor(time).as_str() <= id.as_str());
        assert!(uuid_floor(time + 1).as_str() > id.as_str());
        assert_eq!(uuid_time(&uuid::Uuid::new_v4().to_string()), None);
        assert_eq!(uuid_time("toy-1"), None);
    }
}
