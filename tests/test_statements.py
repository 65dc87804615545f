"""What a statement does, read from its text: tables, paging placeholders, IN-list lengths."""

from __future__ import annotations

from querywatch import _statements
from querywatch.fingerprinting import fingerprint


def test_tables_read_drop_schemas_aliases_and_quotes() -> None:
    """FROM and JOIN tables are read without schema, alias or quotes."""
    shape = fingerprint(
        'SELECT * FROM public."Users" AS u, tags t JOIN items AS i ON i.owner = u.id WHERE 1 = 1'
    )
    assert _statements.tables_read(shape) == {"Users", "items", "tags"}


def test_table_written_is_the_target_of_the_write() -> None:
    """INSERT, UPDATE and DELETE name the table they write."""
    assert [
        _statements.table_written(fingerprint(sql))
        for sql in ("INSERT INTO s.items (a) VALUES (1)", "UPDATE items SET a = 1", "DELETE FROM x")
    ] == ["items", "items", "x"]


def test_paging_slots_of_every_paramstyle() -> None:
    """LIMIT, OFFSET and keyset placeholders are found as positions or names."""
    assert _statements.paging_slots("SELECT x FROM t WHERE p = ? AND id > ? LIMIT ? OFFSET ?") == {
        1,
        2,
        3,
    }
    assert _statements.paging_slots("SELECT x FROM t WHERE p = %(p)s LIMIT %(param_1)s") == {
        "param_1"
    }
    assert _statements.paging_slots("SELECT x FROM t WHERE p = $1 LIMIT $2") == {1}


def test_million_item_in_list_is_read_at_its_end() -> None:
    """A statement with a million-item IN list gives the LIMIT's position and the list's
    length (read in C, without a pass per placeholder)."""
    statement = "SELECT x FROM t WHERE id IN (" + ", ".join(["%s"] * 1_000_000) + ") LIMIT %s"
    assert _statements.paging_slots(statement) == {1_000_000}
    assert _statements.in_list_length(statement, ()) == 1_000_000


def test_in_list_length_counts_cast_placeholders() -> None:
    """psycopg's `%(id_1)s::INTEGER` placeholders count as list items."""
    statement = "SELECT x FROM t WHERE t.id IN (%(id_1_1)s::INTEGER, %(id_1_2)s::INTEGER)"
    assert _statements.in_list_length(statement, {}) == 2


def test_any_array_length_is_its_parameter_length() -> None:
    """`= ANY(%(p)s)` takes its length from the array bound to it."""
    assert (
        _statements.in_list_length("SELECT x FROM t WHERE id = ANY(%(p)s)", {"p": [1, 2, 3]}) == 3
    )
