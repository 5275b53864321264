//! Inserts that the module owning a table builds and another commits together with its own:
//! the write-ahead of a saga is the idempotency record, the order and the saga rows at once.
//! They go to the database in one round trip: on PostgreSQL as ONE statement, on SQLite as one
//! query of several statements.

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection};

use crate::db::{Backend, Db};

/// A value for one parameter of an [`Insert`].
#[derive(Debug, Clone)]
enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
}

/// One `INSERT INTO t (...) VALUES ($1, ...)` with its arguments.
#[derive(Debug, Clone)]
pub struct Insert {
    sql: &'static str,
    args: Vec<Arg>,
}

impl Insert {
    /// An insert whose parameters are `$1`..`$n`, bound in order by [`Insert::text`] and
    /// [`Insert::int`]. It must be a plain INSERT without RETURNING, and `sql` must hold no
    /// other `$` than its parameters.
    pub fn new(sql: &'static str) -> Self {
        Self { sql, args: Vec::new() }
    }

    /// Binds the next parameter to a text value or NULL.
    pub fn text(mut self, value: Option<impl Into<String>>) -> Self {
        self.args.push(Arg::Text(value.map(Into::into)));
        self
    }

    /// Binds the next parameter to an integer or NULL.
    pub fn int(mut self, value: Option<i64>) -> Self {
        self.args.push(Arg::Int(value));
        self
    }
}

/// Commits `inserts` atomically as one transaction: all of them or, on any error (a unique
/// violation, say), none. Returns the connection it used, for the caller's next statement
/// (handing a connection back to the pool costs a round trip).
pub async fn commit_together(db: &Db, inserts: &[Insert]) -> Result<PoolConnection<Any>, sqlx::Error> {
    let mut conn = db.pool.acquire().await?;
    match db.backend {
        // A single statement is its own transaction: no BEGIN and COMMIT round trips.
        Backend::Postgres => execute_together(&mut conn, inserts).await?,
        Backend::Sqlite => {
            let mut tx = conn.begin().await?;
            execute_together(&mut tx, inserts).await?;
            tx.commit().await?;
        }
    }
    Ok(conn)
}

/// Runs `inserts` on `conn`, inside whatever transaction it is in, in one round trip: on
/// PostgreSQL as one statement (every insert but the last as a data-modifying CTE); on SQLite as
/// one query of several statements, which its worker thread runs in one hand-off.
pub async fn execute_together(conn: &mut AnyConnection, inserts: &[Insert]) -> Result<(), sqlx::Error> {
    match inserts {
        [] => {}
        [insert] => {
            bind(sqlx::query(insert.sql), &insert.args).execute(&mut *conn).await?;
        }
        _ => {
            let (sql, args) = combine(inserts, conn.backend_name() == "PostgreSQL");
            bind(sqlx::query(&sql), &args).execute(&mut *conn).await?;
        }
    }
    Ok(())
}

/// The inserts as one query, each one's parameters renumbered after the ones before it: with
/// `ctes`, `WITH w0 AS (first), w1 AS (second) last`; without, `first; second; last`.
fn combine(inserts: &[Insert], ctes: bool) -> (String, Vec<Arg>) {
    let mut args: Vec<Arg> = Vec::new();
    let mut shifted = Vec::with_capacity(inserts.len());
    for insert in inserts {
        shifted.push(shift_parameters(insert.sql, args.len()));
        args.extend(insert.args.iter().cloned());
    }
    if !ctes {
        return (shifted.join("; "), args);
    }
    let main = shifted.pop().unwrap_or_default();
    let ctes: Vec<String> = shifted.iter().enumerate().map(|(i, sql)| format!("w{i} AS ({sql})")).collect();
    (format!("WITH {} {main}", ctes.join(", ")), args)
}

/// `sql` with every `$n` turned into `$(n + offset)`.
fn shift_parameters(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut n = String::new();
        while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        match n.parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&n),
        }
    }
    out
}

fn bind<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for arg in args {
        query = match arg {
            Arg::Text(v) => query.bind(v.as_deref()),
            Arg::Int(v) => query.bind(*v),
        };
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_inserts_into_one_statement() {
        let inserts = [
            Insert::new("INSERT INTO a (x, y) VALUES ($1, $2)").text(Some("x")).int(Some(1)),
            Insert::new("INSERT INTO b (z) VALUES ($1)").int(None),
            Insert::new("INSERT INTO c (u, v) VALUES ($2, $1)").text(None::<String>).text(Some("v")),
        ];
        let (sql, args) = combine(&inserts, true);
        assert_eq!(
            sql,
            "WITH w0 AS (INSERT INTO a (x, y) VALUES ($1, $2)), w1 AS (INSERT INTO b (z) VALUES ($3)) \
             INSERT INTO c (u, v) VALUES ($5, $4)"
        );
        assert_eq!(args.len(), 5);
        let (sql, args) = combine(&inserts, false);
        assert_eq!(
            sql,
            "INSERT INTO a (x, y) VALUES ($1, $2); INSERT INTO b (z) VALUES ($3); INSERT INTO c (u, v) VALUES ($5, $4)"
        );
        assert_eq!(args.len(), 5);
        assert_eq!(shift_parameters("VALUES ($1, $10, 'a$')", 3), "VALUES ($4, $13, 'a$')");
    }
}
