//! Inserts that the module owning a table builds and another commits together with its own:
//! the write-ahead of a saga is the idempotency record, the order and the saga rows at once.
//! They go to the database in one round trip: on PostgreSQL as ONE statement, on SQLite as one
//! query of several statements.

use sqlx::AnyConnection;

use crate::db::Backend;
use crate::sql::{Sql, Value};

/// One `INSERT INTO table (columns) VALUES (values)`, built column by column.
#[derive(Debug, Clone)]
pub struct Insert {
    table: &'static str,
    columns: Vec<&'static str>,
    values: Vec<Value<'static>>,
}

impl Insert {
    /// An insert into `table`; add its columns with [`Insert::value`].
    pub fn into(table: &'static str) -> Self {
        Self { table, columns: Vec::new(), values: Vec::new() }
    }

    /// Sets `column` to `value`.
    pub fn value<'v>(mut self, column: &'static str, value: impl Into<Value<'v>>) -> Self {
        self.columns.push(column);
        self.values.push(value.into().into_owned());
        self
    }

    /// Writes the statement into `sql`, binding its values there.
    fn render<'a>(&'a self, sql: &mut Sql<'a>) {
        sql.push("INSERT INTO ").push(self.table).push(" (").push(&self.columns.join(", ")).push(") VALUES ");
        sql.tuple(self.values.iter().cloned());
    }
}

/// Runs `inserts` on `conn`, inside whatever transaction it is in, in one round trip: all of
/// them or, on any error (a unique violation, say), none.
pub async fn execute_together(conn: &mut AnyConnection, inserts: &[Insert]) -> Result<(), sqlx::Error> {
    if inserts.is_empty() {
        return Ok(());
    }
    combine(inserts, Backend::of(conn)).query().execute(&mut *conn).await?;
    Ok(())
}

/// The inserts as one query. PostgreSQL: `WITH w0 AS (first), w1 AS (second) last`, one
/// statement, so its own transaction. SQLite: `first; second; last`, which its worker thread
/// runs in one hand-off.
fn combine(inserts: &[Insert], backend: Backend) -> Sql<'_> {
    let mut sql = Sql::default();
    let (last, rest) = inserts.split_last().expect("at least one insert");
    match backend {
        Backend::Postgres => {
            if !rest.is_empty() {
                sql.push("WITH ");
                sql.join(rest.iter().enumerate(), ", ", |sql, (i, insert)| {
                    sql.push(&format!("w{i} AS ("));
                    insert.render(sql);
                    sql.push(")");
                });
                sql.push(" ");
            }
        }
        Backend::Sqlite => {
            for insert in rest {
                insert.render(&mut sql);
                sql.push("; ");
            }
        }
    }
    last.render(&mut sql);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_inserts_into_one_query() {
        let inserts = [
            Insert::into("a").value("x", "x").value("y", 1),
            Insert::into("b").value("z", None::<i64>),
            Insert::into("c").value("u", None::<String>).value("v", "v"),
        ];
        let sql = combine(&inserts, Backend::Postgres);
        assert_eq!(
            sql.text(),
            "WITH w0 AS (INSERT INTO a (x, y) VALUES ($1, $2)), w1 AS (INSERT INTO b (z) VALUES ($3)) \
             INSERT INTO c (u, v) VALUES ($4, $5)"
        );
        assert_eq!(sql.len(), 5);
        let sql = combine(&inserts, Backend::Sqlite);
        assert_eq!(
            sql.text(),
            "INSERT INTO a (x, y) VALUES ($1, $2); INSERT INTO b (z) VALUES ($3); INSERT INTO c (u, v) VALUES ($4, $5)"
        );
        assert_eq!(combine(&inserts[..1], Backend::Postgres).text(), "INSERT INTO a (x, y) VALUES ($1, $2)");
    }
}
