"""tenantsafe.recording.recorder: what of a recorder's statements a replay may run, and how."""

from __future__ import annotations

import datetime

import pytest

from tenantsafe.recording import SEPARATOR
from tenantsafe.recording.recorder import Recorder, Statement, _checked, _joined, _normalised

APPLIED_AT = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
# MigrationRecorder.record_applied() as Django sends it: migration_qs.create() returns the id.
RECORD_APPLIED = (
    'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (%s, %s, %s) '
    'RETURNING "django_migrations"."id"'
)


def test_the_applied_row_takes_the_replays_own_time():
    statement = Statement(RECORD_APPLIED, ["notes", "0001_initial", APPLIED_AT], False)

    assert _normalised(statement) == Statement(
        'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES '
        '(%s, %s, statement_timestamp()) RETURNING "django_migrations"."id"',
        ["notes", "0001_initial"],
        False,
    )


def test_the_applied_row_without_returning_is_normalised_too():
    sql = 'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (%s, %s, %s)'

    normalised = _normalised(Statement(sql, ("notes", "0002_more", APPLIED_AT), False))

    assert normalised.sql.endswith("VALUES (%s, %s, statement_timestamp())")
    assert normalised.params == ["notes", "0002_more"]


@pytest.mark.parametrize(
    "statement",
    [
        # Another table, the same shape.
        Statement(
            'INSERT INTO "notes_note" ("app", "name", "applied") VALUES (%s, %s, %s)',
            ["a", "b", APPLIED_AT],
            False,
        ),
        # Several rows at once: not what record_applied() sends.
        Statement(RECORD_APPLIED, [["notes", "0001_initial", APPLIED_AT]], True),
        # Bound already (as a recording holds it): nothing to replace.
        Statement(
            'INSERT INTO "django_migrations" ("app", "name", "applied") VALUES '
            "('notes', '0001_initial', statement_timestamp())",
            None,
            False,
        ),
        Statement('CREATE TABLE "notes_note" ("id" bigint)', None, False),
    ],
)
def test_other_statements_are_kept_as_sent(statement):
    assert _normalised(statement) is statement


def recorder_of(schema: str, *statements: Statement, read_tenant_row: str = "") -> Recorder:
    recorder = Recorder(schema)
    recorder.statements.extend(statements)
    recorder.read_tenant_row = read_tenant_row
    return recorder


CREATE = Statement('CREATE TABLE "notes_note" ("id" bigint NOT NULL)', None, False)

# (statements after CREATE, identifying words, the refusal's start).
REFUSALS = [
    (
        Statement("VACUUM ANALYZE notes_note", None, False),
        [],
        "'VACUUM ANALYZE notes_note' cannot run inside a transaction",
    ),
    (
        Statement('REINDEX TABLE CONCURRENTLY "notes_note"', None, False),
        [],
        "'REINDEX TABLE CONCURRENTLY \"notes_note\"' cannot run inside a transaction",
    ),
    (Statement("COMMIT", None, False), [], "'COMMIT' controls the transaction"),
    (
        Statement("UPDATE notes_note SET id = 1; BEGIN", None, False),
        [],
        "'UPDATE notes_note SET id = 1; BEGIN' controls the transaction",
    ),
    # The schema's name in the text; a domain in the parameters; a field value in a list of
    # parameters (executemany).
    (
        Statement('CREATE VIEW "alpha"."v" AS SELECT 1', None, False),
        ["alpha"],
        "'CREATE VIEW \"alpha\".\"v\" AS SELECT 1' names 'alpha', which belongs to the tenant "
        'of schema "alpha"',
    ),
    (
        Statement("INSERT INTO notes_note (body) VALUES (%s)", ["Welcome to alpha.example"], False),
        ["alpha", "alpha.example"],
        "'INSERT INTO notes_note (body) VALUES (%s)' names 'alpha.example'",
    ),
    (
        Statement(
            "INSERT INTO notes_note (body) VALUES (%s)", [["hello"], ["From ACME Corp"]], True
        ),
        ["alpha", "Acme Corp"],
        "'INSERT INTO notes_note (body) VALUES (%s)' names 'ACME Corp'",
    ),
    (
        Statement("INSERT INTO notes_note (body) VALUES (%(body)s)", {"body": "alpha"}, False),
        ["alpha"],
        "'INSERT INTO notes_note (body) VALUES (%(body)s)' names 'alpha'",
    ),
]


@pytest.mark.parametrize(("statement", "identifying", "refusal"), REFUSALS)
def test_a_recording_that_cannot_be_replayed_says_why(statement, identifying, refusal):
    later = Statement("CREATE INDEX notes_note_id ON notes_note (id)", None, False)
    recorder = recorder_of("alpha", CREATE, statement, later)

    kept, problem = _checked(recorder, identifying)

    assert kept == []
    assert problem.startswith(refusal)


def test_a_read_of_the_tenants_row_refuses_the_recording():
    read = 'SELECT "customers_client"."id" FROM "customers_client" WHERE "schema_name" = %s'
    recorder = recorder_of("alpha", CREATE, read_tenant_row=read)

    assert _checked(recorder, ["alpha"]) == (
        [],
        f"{read!r} reads the tenant's own row",
    )


def test_words_are_matched_whole_and_in_any_case():
    # "alpha" inside "alphabet" or "alpha_2" is another word; "ALPHA" is the same one.
    inside = Statement("INSERT INTO notes_note (body) VALUES (%s)", ["alphabet alpha_2"], False)
    recorder = recorder_of("alpha", CREATE, inside)

    assert _checked(recorder, ["alpha", ""]) == ([CREATE, inside], "")
    shouting = Statement("INSERT INTO notes_note (body) VALUES ('ALPHA')", None, False)
    assert _checked(recorder_of("alpha", shouting), ["alpha"])[1].endswith(
        "names 'ALPHA', which belongs to the tenant of schema \"alpha\""
    )


def test_a_replayable_recording_is_kept_as_a_replay_runs_it():
    applied = Statement(RECORD_APPLIED, ["notes", "0001_initial", APPLIED_AT], False)
    concurrent = Statement('CREATE INDEX CONCURRENTLY "n_idx" ON "notes_note" ("id")', None, False)
    recorder = recorder_of("alpha", CREATE, concurrent, applied)

    kept, problem = _checked(recorder, ["alpha", "alpha.localhost"])

    assert problem == ""
    assert kept == [
        CREATE,
        # Not allowed inside the replay's transaction, and of no use there.
        Statement('CREATE INDEX "n_idx" ON "notes_note" ("id")', None, False),
        _normalised(applied),
    ]


def test_statements_are_joined_so_that_a_trailing_comment_still_ends():
    parts = ["CREATE TABLE t (id int) -- the first", "INSERT INTO t VALUES (1)"]

    joined = _joined(parts)

    assert joined == "CREATE TABLE t (id int) -- the first\n;\nINSERT INTO t VALUES (1)"
    assert joined.split(SEPARATOR) == parts
    assert _joined([]) == ""
