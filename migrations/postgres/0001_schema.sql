-- order-saga schema, PostgreSQL. Applied to every configured database: the log database uses the
-- saga and order tables, the inventory participant the product tables.
-- Times are milliseconds since the Unix epoch (BIGINT) so both backends store them alike.

-- The saga log: one row per saga, the current state the engine resumes from.
CREATE TABLE sagas (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    version          BIGINT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('running', 'compensating', 'completed', 'compensated')),
    stuck            BIGINT NOT NULL DEFAULT 0,
    input            TEXT NOT NULL,
    -- Outputs of the steps that succeeded, a JSON object keyed by step name (design rule 6).
    outputs          TEXT NOT NULL DEFAULT '{}',
    -- Why the saga compensates, JSON {code, detail, ...}; NULL while it goes forward.
    failure          TEXT,
    current_step     BIGINT NOT NULL DEFAULT 0,
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_seq         BIGINT NOT NULL DEFAULT 0,
    owner            TEXT,
    lease_expires_at BIGINT NOT NULL DEFAULT 0,
    -- Fencing token: bumped by every claim, checked by every log write.
    generation       BIGINT NOT NULL DEFAULT 0,
    deadline_at      BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
-- The recovery loop looks for unfinished sagas with an expired lease.
CREATE INDEX sagas_unfinished ON sagas (lease_expires_at) WHERE state IN ('running', 'compensating');
CREATE INDEX sagas_owner ON sagas (owner) WHERE state IN ('running', 'compensating');

-- Append-only history of every saga; the (saga_id, seq) key makes a duplicate event impossible.
-- No foreign key to sagas: events are only written beside their saga's fenced update, and the
-- check would cost a lookup per event on the hot path.
CREATE TABLE saga_events (
    saga_id TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    step    TEXT,
    event   TEXT NOT NULL,
    detail  TEXT,
    at      BIGINT NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

-- Maps a client's Idempotency-Key (scoped to an endpoint) to the saga it started.
CREATE TABLE idempotency_keys (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    saga_id     TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Orders, written ahead as pending with the saga that settles them.
CREATE TABLE orders (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled')),
    -- JSON [{product_id, quantity, unit_price_cents}]; prices are null until create_order.
    items       TEXT NOT NULL,
    total_cents BIGINT,
    saga_id     TEXT NOT NULL,
    -- The cancel_order saga, once one has been started: at most one per order.
    cancel_saga_id TEXT,
    failure     TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id, id);
CREATE INDEX orders_status ON orders (status, id);

-- The inventory participant.
CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    available   BIGINT NOT NULL CHECK (available >= 0),
    reserved    BIGINT NOT NULL CHECK (reserved >= 0),
    sold        BIGINT NOT NULL CHECK (sold >= 0),
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- One row per (saga, product): what place_order holds. A 'released' row written before any
-- reservation is a tombstone that turns a late reserve into a no-op.
CREATE TABLE reservations (
    saga_id    TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    status     TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released', 'returned')),
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, product_id)
);
