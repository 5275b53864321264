-- A baseline database: run after migrations/postgres/0001_schema.sql (the service's schema) by
-- bench/run.sh, as `psql -v nprod=1000 -v stock=1000000000 -f setup.sql`. The same products as
-- the load generator creates through the API: p-1..p-N, price 100 + i cents, `stock` units each.

-- The service's clock: milliseconds since the Unix epoch (an inlined SQL function).
CREATE FUNCTION now_ms() RETURNS bigint LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

INSERT INTO products (id, name, price_cents, available, reserved, sold, created_at, updated_at)
SELECT 'p-' || i, 'Product ' || i, 100 + i, :stock, 0, 0, now_ms(), now_ms()
FROM generate_series(1, :nprod) AS i;
