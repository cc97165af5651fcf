//! The two storage backends behind one small SQL interface: SQLite (the embedded default, one
//! file in the state directory) and PostgreSQL (one registry shared by several bootservers).
//!
//! The registry's queries are written once, in the common subset of both dialects, with SQLite's
//! numbered placeholders (`?1`) and PostgreSQL's `greatest(a, b)`; [`translate`] turns them into
//! the other dialect's spelling (`$1`, SQLite's scalar `max(a, b)`). Values travel as [`Value`],
//! which converts itself to whatever type PostgreSQL inferred for a placeholder (an integer to
//! `bigint` or `boolean`), so one parameter list serves both.

use std::borrow::Cow;
use std::fmt;

/// A database error of either backend, or a value that did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] postgres::Error),
    #[error("column {column}: {why}")]
    Decode { column: usize, why: String },
}

impl DbError {
    /// SQLite busy/locked, PostgreSQL serialization failure or deadlock: the write may succeed
    /// when tried again.
    pub fn is_busy(&self) -> bool {
        match self {
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            Self::Postgres(e) => is_retryable(e),
            Self::Decode { .. } => false,
        }
    }
}

/// PostgreSQL's answer to two serializable transactions that touched the same rows: one of them
/// must run again.
pub(crate) fn is_retryable(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Bool(bool),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Self::Blob(v.to_vec())
    }
}
impl From<&[u8; 32]> for Value {
    fn from(v: &[u8; 32]) -> Self {
        Self::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// Builds a parameter list: `args![a, b]`.
macro_rules! args {
    ($($e:expr),* $(,)?) => {
        &[$($crate::db::Value::from($e)),*][..]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Self::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Self::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Self::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Self::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Self::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Self::Null => Ok(IsNull::Yes),
            Self::Int(i) => match *ty {
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Self::Bool(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                _ => i64::from(*b).to_sql(ty, out),
            },
            Self::Text(s) => s.to_sql(ty, out),
            Self::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// One result row, decoded.
#[derive(Debug)]
pub(crate) struct Row(Vec<Value>);

pub(crate) fn decode(column: usize, why: impl fmt::Display) -> DbError {
    DbError::Decode {
        column,
        why: why.to_string(),
    }
}

impl Row {
    fn value(&self, i: usize) -> Result<&Value, DbError> {
        self.0.get(i).ok_or_else(|| decode(i, "no such column"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            other => Err(decode(i, format!("expected an integer, found {other:?}"))),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, DbError> {
        self.opt_int(i)?
            .ok_or_else(|| decode(i, "expected an integer, found NULL"))
    }

    pub fn bool(&self, i: usize) -> Result<bool, DbError> {
        Ok(self.int(i)? != 0)
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.value(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            other => Err(decode(i, format!("expected text, found {other:?}"))),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, DbError> {
        self.opt_text(i)?
            .ok_or_else(|| decode(i, "expected text, found NULL"))
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, DbError> {
        match self.value(i)? {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(decode(i, format!("expected bytes, found {other:?}"))),
        }
    }

    /// Column `i` as a `T` parsed from text.
    pub fn parsed<T: std::str::FromStr>(&self, i: usize) -> Result<T, DbError>
    where
        T::Err: fmt::Display,
    {
        let text = self.text(i)?;
        text.parse()
            .map_err(|e| decode(i, format!("{text:?}: {e}")))
    }
}

/// SQL in the registry's spelling (`?N`, `greatest(`) in `dialect`'s.
pub(crate) fn translate(sql: &str, dialect: Dialect) -> Cow<'_, str> {
    match dialect {
        Dialect::Sqlite => {
            if sql.contains("greatest(") {
                Cow::Owned(sql.replace("greatest(", "max("))
            } else {
                Cow::Borrowed(sql)
            }
        }
        Dialect::Postgres => {
            if !sql.contains('?') {
                return Cow::Borrowed(sql);
            }
            // No query of the registry has a '?' inside a string literal.
            Cow::Owned(sql.replace('?', "$"))
        }
    }
}

/// A transaction (or read snapshot) of either backend: what every query function takes.
pub(crate) trait Sql {
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError>;
    /// Runs a query; all its rows.
    fn rows(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError>;

    /// The first row, if any.
    fn row(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }
}

/// An SQLite transaction (its connection).
pub(crate) struct Lite<'a>(pub &'a rusqlite::Connection);

impl Sql for Lite<'_> {
    fn exec(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let sql = translate(sql, Dialect::Sqlite);
        let n = self
            .0
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }

    fn rows(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        let sql = translate(sql, Dialect::Sqlite);
        let mut stmt = self.0.prepare_cached(&sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                use rusqlite::types::ValueRef;
                values.push(match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => return Err(decode(i, format!("unexpected real {v}"))),
                    ValueRef::Text(t) => {
                        Value::Text(std::str::from_utf8(t).map_err(|e| decode(i, e))?.to_owned())
                    }
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }
}

/// A PostgreSQL transaction.
pub(crate) struct PgTx<'a, 'b>(pub &'a mut postgres::Transaction<'b>);

impl<'b> PgTx<'_, 'b> {
    pub fn as_pg(&mut self) -> &mut postgres::Transaction<'b> {
        self.0
    }
}

impl Sql for PgTx<'_, '_> {
    fn exec(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let sql = translate(sql, Dialect::Postgres);
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn postgres::types::ToSql + Sync))
            .collect();
        Ok(self.0.execute(sql.as_ref(), &params)?)
    }

    fn rows(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        use postgres::types::Type;
        let sql = translate(sql, Dialect::Postgres);
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let rows = self.0.query(sql.as_ref(), &params)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = Vec::with_capacity(row.len());
            for (i, column) in row.columns().iter().enumerate() {
                let ty = column.type_();
                let value = if *ty == Type::INT8 {
                    row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
                } else if *ty == Type::INT4 {
                    row.try_get::<_, Option<i32>>(i)?
                        .map(|v| Value::Int(i64::from(v)))
                } else if *ty == Type::INT2 {
                    row.try_get::<_, Option<i16>>(i)?
                        .map(|v| Value::Int(i64::from(v)))
                } else if *ty == Type::BOOL {
                    row.try_get::<_, Option<bool>>(i)?.map(Value::Bool)
                } else if *ty == Type::BYTEA {
                    row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
                } else {
                    row.try_get::<_, Option<String>>(i)?.map(Value::Text)
                };
                values.push(value.unwrap_or(Value::Null));
            }
            out.push(Row(values));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_translate_to_each_dialect() {
        let sql = "UPDATE t SET a = greatest(a, ?1) WHERE b = ?2";
        assert_eq!(
            translate(sql, Dialect::Sqlite),
            "UPDATE t SET a = max(a, ?1) WHERE b = ?2"
        );
        assert_eq!(
            translate(sql, Dialect::Postgres),
            "UPDATE t SET a = greatest(a, $1) WHERE b = $2"
        );
    }
}
