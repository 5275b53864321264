-- Baseline (b), "three transactions": reserve; create + confirm; commit stock, each its own BEGIN..COMMIT.
-- The business writes of one order WITHOUT the saga log, as a baseline for order-saga (see
-- bench/README.md). Run by bench/run.sh as
--   pgbench -n -M prepared -c 64 -j 2 -T 20 -D nprod=1000 -D run=2 -D seq=0 -f three_tx.sql DB
-- on a database made by setup.sql (the service's schema, products p-1..p-1000 and now_ms()).
-- One pgbench "transaction" is one run of this script: one order of 1..3 distinct random
-- products p-1..p-<nprod>, quantity 1..3 each. Items are written in product order, as the
-- service does (by a different but equally total order), so that concurrent orders cannot
-- deadlock.

-- How many items, and three distinct product numbers: x; y != x; z not in {x, y}.
\set n random(1, 3)
\set x random(0, :nprod - 1)
\set y random(0, :nprod - 2)
\set y :y + case when :y >= :x then 1 else 0 end
\set lo least(:x, :y)
\set hi greatest(:x, :y)
\set z random(0, :nprod - 3)
\set z :z + case when :z >= :lo then 1 else 0 end
\set z :z + case when :z >= :hi then 1 else 0 end
-- i1 < i2 < i3: the products of the order, 1-based.
\if :n = 1
\set i1 :x + 1
\elif :n = 2
\set i1 :lo + 1
\set i2 :hi + 1
\else
\set i1 least(:lo, :z) + 1
\set i3 greatest(:hi, :z) + 1
\set i2 :lo + :hi + :z + 3 - :i1 - :i3
\endif
\set q1 random(1, 3)
\set q2 random(1, 3)
\set q3 random(1, 3)
-- A unique order id: pgbench keeps variables per client from one script run to the next.
\set seq :seq + 1
\set oid :run * 1000000000000 + :client_id * 1000000000 + :seq

BEGIN;
-- reserve_stock: per item, take the stock and write the reservation row.
INSERT INTO reservations (saga_id, product_id, quantity, status, updated_at) VALUES (('bench-' || :oid::text), ('p-' || :i1::text), :q1, 'reserved', now_ms());
UPDATE products SET available = available - :q1, reserved = reserved + :q1, updated_at = now_ms() WHERE id = ('p-' || :i1::text) AND available >= :q1 RETURNING price_cents AS p1 \gset
\if :n >= 2
INSERT INTO reservations (saga_id, product_id, quantity, status, updated_at) VALUES (('bench-' || :oid::text), ('p-' || :i2::text), :q2, 'reserved', now_ms());
UPDATE products SET available = available - :q2, reserved = reserved + :q2, updated_at = now_ms() WHERE id = ('p-' || :i2::text) AND available >= :q2 RETURNING price_cents AS p2 \gset
\endif
\if :n = 3
INSERT INTO reservations (saga_id, product_id, quantity, status, updated_at) VALUES (('bench-' || :oid::text), ('p-' || :i3::text), :q3, 'reserved', now_ms());
UPDATE products SET available = available - :q3, reserved = reserved + :q3, updated_at = now_ms() WHERE id = ('p-' || :i3::text) AND available >= :q3 RETURNING price_cents AS p3 \gset
\endif
COMMIT;
BEGIN;
-- create_order and confirm: the order with its priced items and total, then confirmed.
\if :n = 1
\set total :p1 * :q1
INSERT INTO orders (id, customer_id, status, items, total_cents, saga_id, created_at, updated_at) VALUES (('bench-' || :oid::text), 'bench-' || :client_id::text, 'pending', json_build_array(json_build_object('product_id', ('p-' || :i1::text), 'quantity', :q1::bigint, 'unit_price_cents', :p1::bigint))::text, :total, ('bench-' || :oid::text), now_ms(), now_ms());
\elif :n = 2
\set total :p1 * :q1 + :p2 * :q2
INSERT INTO orders (id, customer_id, status, items, total_cents, saga_id, created_at, updated_at) VALUES (('bench-' || :oid::text), 'bench-' || :client_id::text, 'pending', json_build_array(json_build_object('product_id', ('p-' || :i1::text), 'quantity', :q1::bigint, 'unit_price_cents', :p1::bigint), json_build_object('product_id', ('p-' || :i2::text), 'quantity', :q2::bigint, 'unit_price_cents', :p2::bigint))::text, :total, ('bench-' || :oid::text), now_ms(), now_ms());
\else
\set total :p1 * :q1 + :p2 * :q2 + :p3 * :q3
INSERT INTO orders (id, customer_id, status, items, total_cents, saga_id, created_at, updated_at) VALUES (('bench-' || :oid::text), 'bench-' || :client_id::text, 'pending', json_build_array(json_build_object('product_id', ('p-' || :i1::text), 'quantity', :q1::bigint, 'unit_price_cents', :p1::bigint), json_build_object('product_id', ('p-' || :i2::text), 'quantity', :q2::bigint, 'unit_price_cents', :p2::bigint), json_build_object('product_id', ('p-' || :i3::text), 'quantity', :q3::bigint, 'unit_price_cents', :p3::bigint))::text, :total, ('bench-' || :oid::text), now_ms(), now_ms());
\endif
UPDATE orders SET status = 'confirmed', updated_at = now_ms() WHERE id = ('bench-' || :oid::text) AND status = 'pending';
COMMIT;
BEGIN;
-- commit_stock: per item, the reservation committed and its units sold.
UPDATE reservations SET status = 'committed', updated_at = now_ms() WHERE saga_id = ('bench-' || :oid::text) AND product_id = ('p-' || :i1::text) AND status = 'reserved';
UPDATE products SET reserved = reserved - :q1, sold = sold + :q1, updated_at = now_ms() WHERE id = ('p-' || :i1::text);
\if :n >= 2
UPDATE reservations SET status = 'committed', updated_at = now_ms() WHERE saga_id = ('bench-' || :oid::text) AND product_id = ('p-' || :i2::text) AND status = 'reserved';
UPDATE products SET reserved = reserved - :q2, sold = sold + :q2, updated_at = now_ms() WHERE id = ('p-' || :i2::text);
\endif
\if :n = 3
UPDATE reservations SET status = 'committed', updated_at = now_ms() WHERE saga_id = ('bench-' || :oid::text) AND product_id = ('p-' || :i3::text) AND status = 'reserved';
UPDATE products SET reserved = reserved - :q3, sold = sold + :q3, updated_at = now_ms() WHERE id = ('p-' || :i3::text);
\endif
COMMIT;
