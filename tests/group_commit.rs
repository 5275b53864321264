//! SQLite's group commit: concurrent units share one transaction, each in its own savepoint, so
//! a unit that fails undoes only itself, and a unit's result is returned only once the whole
//! group is durable. Group commit is SQLite's alone, so these tests run on SQLite whatever
//! TEST_DATABASE_URL says.

use order_saga::db::{Db, PoolSettings};
use order_saga::group_commit::GroupCommit;
use sqlx::Row;

/// A fresh SQLite file with a table the units write to.
async fn fresh() -> (Db, String) {
    let dir = std::env::temp_dir().join("order-saga-tests");
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let path = dir.join(format!("group-{}.db", uuid::Uuid::new_v4())).display().to_string();
    let db = Db::connect(&path, &PoolSettings::default()).await.expect("open SQLite");
    sqlx::query("CREATE TABLE units (id INTEGER PRIMARY KEY, note TEXT NOT NULL)").execute(&db.pool).await.unwrap();
    (db, path)
}

/// Inserts row `id`, then fails on purpose if `fail`.
async fn insert(group: &GroupCommit, id: i64, fail: bool) -> Result<Result<i64, String>, sqlx::Error> {
    group
        .run(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO units (id, note) VALUES ($1, 'x')")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if fail { Err(format!("unit {id} fails after writing")) } else { Ok(id) }
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_units_commit_together_and_a_failing_one_undoes_only_itself() {
    let (db, path) = fresh().await;
    let group = GroupCommit::start(db.pool.clone());
    let tasks: Vec<_> = (0..60)
        .map(|id| {
            let group = group.clone();
            tokio::spawn(async move { (id, insert(&group, id, id % 4 == 0).await) })
        })
        .collect();
    for task in tasks {
        let (id, result) = task.await.unwrap();
        let result = result.expect("the group commits");
        if id % 4 == 0 {
            assert_eq!(result, Err(format!("unit {id} fails after writing")), "unit {id} gets its own error");
        } else {
            assert_eq!(result, Ok(id), "unit {id} gets its own result");
        }
    }
    // Read back through a new connection to the file: what was answered is what is stored.
    db.pool.close().await;
    let reopened = Db::connect(&path, &PoolSettings::default()).await.unwrap();
    let rows = sqlx::query("SELECT id FROM units ORDER BY id").fetch_all(&reopened.pool).await.unwrap();
    let stored: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>("id")).collect();
    let expected: Vec<i64> = (0..60).filter(|id| id % 4 != 0).collect();
    assert_eq!(stored, expected, "the failed units left nothing, the others all committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_hitting_a_constraint_fails_alone() {
    let (db, _path) = fresh().await;
    let group = GroupCommit::start(db.pool.clone());
    let (a, b, c) = tokio::join!(insert(&group, 7, false), insert(&group, 7, false), insert(&group, 8, false));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "one of two same-id inserts wins: {a:?} {b:?}"
    );
    let loser = if a.is_ok() { b } else { a };
    assert!(loser.unwrap_err().contains("UNIQUE"), "the other sees the constraint");
    assert_eq!(c, Ok(8), "a unit beside them is unaffected");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM units").fetch_one(&db.pool).await.unwrap();
    assert_eq!(count, 2);
}
