//! A small statement builder: SQL text and the values bound into it, with the placeholders
//! (`$1`, `$2`, ...) numbered by the builder as values are bound, never by hand. Both backends
//! read `$n` (sqlx's `QueryBuilder` on `Any` writes `?`, which PostgreSQL refuses).

use std::borrow::Cow;
use std::fmt::Write as _;

use sqlx::Any;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

/// A value bound to one placeholder: text or an integer, either possibly NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// A text value or NULL.
    Text(Option<Cow<'a, str>>),
    /// An integer or NULL (booleans are stored as 0 / 1).
    Int(Option<i64>),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Some(Cow::Borrowed(v)))
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(Some(Cow::Borrowed(v.as_str())))
    }
}

impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Value::Text(Some(Cow::Owned(v)))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Value::Text(v.map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Value<'_> {
    fn from(v: Option<String>) -> Self {
        Value::Text(v.map(Cow::Owned))
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(Some(i64::from(v)))
    }
}

impl Value<'_> {
    /// The same value, owning its text, so that it may outlive what it was built from.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Text(t) => Value::Text(t.map(|t| Cow::Owned(t.into_owned()))),
            Value::Int(i) => Value::Int(i),
        }
    }
}

/// SQL text with its bound values.
#[derive(Debug, Clone, Default)]
pub struct Sql<'a> {
    text: String,
    args: Vec<Value<'a>>,
}

impl<'a> Sql<'a> {
    /// A statement starting with `text`, which holds no placeholder.
    pub fn new(text: &str) -> Self {
        Self { text: text.to_string(), args: Vec::new() }
    }

    /// Appends SQL text (no placeholders in it).
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Binds a value and writes its placeholder.
    pub fn bind(&mut self, value: impl Into<Value<'a>>) -> &mut Self {
        self.args.push(value.into());
        let _ = write!(self.text, "${}", self.args.len());
        self
    }

    /// Writes `(v1, v2, ...)`, a placeholder for each value.
    pub fn tuple<V: Into<Value<'a>>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Self {
        self.push("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
        self.push(")")
    }

    /// Writes `items` separated by `separator`, each by `write`.
    pub fn join<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        separator: &str,
        mut write: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.push(separator);
            }
            write(self, item);
        }
        self
    }

    /// The SQL text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// How many values are bound.
    pub fn len(&self) -> usize {
        self.args.len()
    }

    /// True when no value is bound.
    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }

    /// The statement, ready to execute or fetch.
    pub fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut query = sqlx::query(&self.text);
        for arg in &self.args {
            query = match arg {
                Value::Text(v) => query.bind(v.as_deref()),
                Value::Int(v) => query.bind(*v),
            };
        }
        query
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_placeholders_as_values_are_bound() {
        let mut sql = Sql::new("UPDATE t SET a = ");
        sql.bind(1).push(" WHERE id IN ").tuple(["x", "y"]).push(" AND b = ").bind(None::<i64>);
        assert_eq!(sql.text(), "UPDATE t SET a = $1 WHERE id IN ($2, $3) AND b = $4");
        assert_eq!(sql.len(), 4);
        let mut rows = Sql::new("INSERT INTO t (a, b) VALUES ");
        rows.join([(1, "p"), (2, "q")], ", ", |sql, (a, b)| {
            sql.tuple([Value::from(a), Value::from(b)]);
        });
        assert_eq!(rows.text(), "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)");
    }
}
