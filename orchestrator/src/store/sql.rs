//! [`Sql`]: the statements a chat's batch writes, as text with the backend's placeholders and the
//! values to bind. Every step commits several, so they are written directly: building them with
//! sea-query (a statement tree per op, rendered, then dropped) was a twentieth of the server's CPU.
//! Table and column names come from the entities, so they cannot drift from the schema.

use std::fmt::Write as _;

use agentplane_actors::ports::StoreError;
use sea_orm::sea_query::Value;
use sea_orm::{DbBackend, EntityName, IdenStatic, Statement};
use serde::Serialize;

/// One statement being written: `INSERT … VALUES (…), …`, `UPDATE … SET … WHERE …` or
/// `DELETE … WHERE …`.
pub(super) struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
    /// Rows or assignments written so far: the next is preceded by a separator.
    items: usize,
    /// An insert's columns, which each row must match.
    columns: usize,
    /// Whether a `WHERE` was begun: the next condition is joined with `AND`.
    conditions: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Verb {
    Insert,
    Update,
    Delete,
}

impl Sql {
    /// `INSERT OR FAIL INTO "table"`, `UPDATE OR FAIL "table"` or `DELETE FROM "table"`: the start
    /// of a statement, `OR FAIL` only on SQLite ([`Sql::on_conflict_fail`]).
    fn begin(backend: DbBackend, verb: Verb, table: &str) -> Self {
        let text = String::with_capacity(256);
        let mut sql = Sql { backend, text, values: Vec::new(), items: 0, columns: 0, conditions: false };
        let (word, before_table) = match verb {
            Verb::Insert => ("INSERT", " INTO "),
            Verb::Update => ("UPDATE", " "),
            Verb::Delete => ("DELETE", " FROM "),
        };
        sql.text.push_str(word);
        if verb != Verb::Delete {
            sql.on_conflict_fail();
        }
        sql.text.push_str(before_table);
        sql.quoted(table);
        sql
    }

    /// `INSERT INTO table (columns) VALUES`; rows follow with [`Sql::row`].
    pub(super) fn insert<E: EntityName, C: IdenStatic>(
        backend: DbBackend,
        table: E,
        columns: impl IntoIterator<Item = C>,
    ) -> Self {
        let mut sql = Sql::begin(backend, Verb::Insert, table.table_name());
        sql.text.push_str(" (");
        for column in columns {
            if sql.columns > 0 {
                sql.text.push_str(", ");
            }
            sql.quoted(column.as_str());
            sql.columns += 1;
        }
        sql.text.push_str(") VALUES ");
        sql
    }

    /// `INSERT INTO table (columns) VALUES (values)`: one row, each column beside its value.
    pub(super) fn insert_one<E: EntityName, C: IdenStatic, const N: usize>(
        backend: DbBackend,
        table: E,
        row: [(C, Value); N],
    ) -> Self {
        let mut sql = Sql::insert(backend, table, row.iter().map(|(column, _)| *column));
        sql.row(row.into_iter().map(|(_, value)| value));
        sql
    }

    /// One row of an insert: a value per column, in the columns' order.
    pub(super) fn row(&mut self, values: impl IntoIterator<Item = Value>) {
        self.text.push_str(if self.items == 0 { "(" } else { ", (" });
        self.items += 1;
        let mut count = 0;
        for value in values {
            if count > 0 {
                self.text.push_str(", ");
            }
            count += 1;
            self.param(value);
        }
        debug_assert_eq!(count, self.columns, "an insert's row must have a value per column");
        self.text.push(')');
    }

    /// `UPDATE table SET`; assignments follow with [`Sql::set`], then conditions with
    /// [`Sql::and_where`].
    pub(super) fn update<E: EntityName>(backend: DbBackend, table: E) -> Self {
        let mut sql = Sql::begin(backend, Verb::Update, table.table_name());
        sql.text.push_str(" SET ");
        sql
    }

    /// `DELETE FROM table`; conditions follow with [`Sql::and_where`].
    pub(super) fn delete<E: EntityName>(backend: DbBackend, table: E) -> Self {
        Sql::begin(backend, Verb::Delete, table.table_name())
    }

    /// `column = value` in an update's `SET`.
    pub(super) fn set(&mut self, column: impl IdenStatic, value: impl Into<Value>) {
        if self.items > 0 {
            self.text.push_str(", ");
        }
        self.items += 1;
        self.quoted(column.as_str());
        self.text.push_str(" = ");
        self.param(value.into());
    }

    /// `column <op> value`, joined to the conditions before with `AND`; the first ends the
    /// update's assignments.
    pub(super) fn and_where(&mut self, column: impl IdenStatic, op: &str, value: impl Into<Value>) {
        self.text.push_str(if self.conditions { " AND " } else { " WHERE " });
        self.conditions = true;
        self.quoted(column.as_str());
        self.text.push(' ');
        self.text.push_str(op);
        self.text.push(' ');
        self.param(value.into());
    }

    /// On SQLite, ` OR FAIL`: a statement that breaks a constraint stops without undoing its own
    /// earlier rows. Its default (`ABORT`) undoes them, and for that SQLite copies every page a
    /// statement that may write several rows changes into a statement journal first (a multi-row
    /// insert, an update found through a non-unique index). Nothing needs it here: SQLite's
    /// batches are only written inside the writer thread's transaction, which is rolled back
    /// whole when any statement fails ([`super::sqlite_writer`]).
    fn on_conflict_fail(&mut self) {
        if self.backend == DbBackend::Sqlite {
            self.text.push_str(" OR FAIL");
        }
    }

    /// A table or column name, quoted. (Pushed piece by piece: `write!` through the formatting
    /// machinery cost more than the rest of building a statement.)
    fn quoted(&mut self, name: &str) {
        self.text.push('"');
        self.text.push_str(name);
        self.text.push('"');
    }

    fn param(&mut self, value: Value) {
        self.values.push(value);
        match self.backend {
            DbBackend::Postgres => {
                let _ = write!(self.text, "${}", self.values.len());
            }
            _ => self.text.push('?'),
        }
    }

    pub(super) fn statement(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

/// `value` for a JSON column: its text on SQLite (which stores JSON as text), a JSON value on
/// PostgreSQL.
pub(super) fn json(backend: DbBackend, value: &impl Serialize) -> Result<Value, StoreError> {
    Ok(match backend {
        DbBackend::Postgres => Value::Json(Some(Box::new(super::convert::to_json(value)?))),
        _ => Value::String(Some(serde_json::to_string(value).map_err(encoding_error)?)),
    })
}

/// A durable event's payload: its JSON as the event holds it, written once for the store and
/// the sessions that send it.
pub(super) fn event_json(
    backend: DbBackend,
    event: &agentplane_schema::event::SharedEvent,
) -> Result<Value, StoreError> {
    Ok(match backend {
        DbBackend::Postgres => json(backend, &**event)?,
        _ => Value::String(Some(event.json().map_err(encoding_error)?.to_string())),
    })
}

fn encoding_error(e: serde_json::Error) -> StoreError {
    StoreError::Database(format!("encoding JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use agentplane_schema::db::entities::{chats, messages};

    use super::*;

    #[test]
    fn statements_are_written_with_each_backends_placeholders() {
        use messages::Column::{ChatId, Id};
        let mut insert = Sql::insert(DbBackend::Postgres, messages::Entity, [Id, ChatId]);
        insert.row(["a".into(), "b".into()]);
        insert.row(["c".into(), "d".into()]);
        let insert = insert.statement();
        assert_eq!(insert.sql, r#"INSERT INTO "messages" ("id", "chat_id") VALUES ($1, $2), ($3, $4)"#);
        assert_eq!(insert.values.map(|v| v.0.len()), Some(4));
        let one = Sql::insert_one(DbBackend::Sqlite, messages::Entity, [(Id, "a".into()), (ChatId, "b".into())]);
        assert_eq!(one.statement().sql, r#"INSERT OR FAIL INTO "messages" ("id", "chat_id") VALUES (?, ?)"#);

        let mut update = Sql::update(DbBackend::Sqlite, chats::Entity);
        update.set(chats::Column::Status, "idle");
        update.set(chats::Column::LastSeq, 3i64);
        update.and_where(chats::Column::Id, "=", "c");
        update.and_where(chats::Column::Deleted, "=", false);
        assert_eq!(
            update.statement().sql,
            r#"UPDATE OR FAIL "chats" SET "status" = ?, "last_seq" = ? WHERE "id" = ? AND "deleted" = ?"#
        );

        let mut delete = Sql::delete(DbBackend::Postgres, messages::Entity);
        delete.and_where(Id, "=", "a");
        assert_eq!(delete.statement().sql, r#"DELETE FROM "messages" WHERE "id" = $1"#);
    }
}
