//! A small migration runner: each backend's numbered SQL files, embedded in the binary and
//! applied once, in order, to every configured database.

use sqlx::Executor;

use crate::db::{Backend, Db, now_ms};

/// (version, SQL) per backend, in order. Add a file and a line here to migrate.
const POSTGRES: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_schema.sql")),
    (2, include_str!("../migrations/postgres/0002_drop_sagas_owner.sql")),
];
const SQLITE: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_schema.sql")),
    (2, include_str!("../migrations/sqlite/0002_drop_sagas_owner.sql")),
];

/// Applies the migrations `db` has not seen yet, each in its own transaction.
pub async fn run(db: &Db) -> Result<(), sqlx::Error> {
    let migrations = match db.backend {
        Backend::Postgres => POSTGRES,
        Backend::Sqlite => SQLITE,
    };
    db.pool
        .execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
    for (version, sql) in migrations {
        let mut tx = db.pool.begin().await?;
        if db.backend == Backend::Postgres {
            // Instances starting together must not apply the same migration twice.
            tx.execute("SELECT pg_advisory_xact_lock(7318201)").await?;
        }
        let done: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_none() {
            tx.execute(*sql).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}
