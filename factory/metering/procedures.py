"""The two hot ledger writes as PostgreSQL functions: one round trip per reservation and one per
settlement, where the same steps as SQL statements from Python cost about a dozen round trips
each (a lock, reads, an UPDATE and INSERT per package, BEGIN, COMMIT). On a server a network hop
away that is the whole cost of a request's metering (bench/ledger_ops.py).

`factory_reserve` and `factory_settle` do exactly what `Ledger.reserve` and `settlement.settle`
do on SQLite, statement for statement: lock the tenant's row, then spend its live packages in
the spend order (schema.SPEND_ORDER). Both backends run the same test suite
(tests/unit/test_ledger.py), and a differential test plays one random sequence of reserves,
settlements and releases on both and compares every package afterwards, so the two stay one
ledger. Arguments are checked in Python before the call (schema.check_*), so the functions trust
their types and ranges; what only the database can know comes back as an SQLSTATE of class LF.

The SQL below is frozen, like schema.v1_tables: a migration creates these functions, and a change
is a new migration that replaces them (migration 3 made `factory_settle` charge factory tokens,
migration 4 gave all three a model category and put trials first),
so every process on every node runs the functions its schema version names.
"""

from __future__ import annotations

from factory.metering.schema import LedgerError, QuotaExceeded, UnknownTenant

UNKNOWN_TENANT = "LF001"
TAKEN = "LF002"
QUOTA = "LF003"
REFUSED = "LF004"  # any other refusal; the message says why

# Charge `tokens` to the tenant's live packages in spending order; returns what no package could
# cover (the overage). settlement.charge_available.
_CHARGE_AVAILABLE = """
CREATE OR REPLACE FUNCTION factory_charge_available(p_tenant_id integer, p_tokens bigint, p_at text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    pkg record;
    part bigint;
BEGIN
    FOR pkg IN
        SELECT p.id, p.tokens_total - p.tokens_used - p.tokens_reserved AS free FROM packages p
        WHERE p.tenant_id = p_tenant_id AND (p.expires_at IS NULL OR p.expires_at > p_at)
          AND p.tokens_total - p.tokens_used - p.tokens_reserved > 0
        ORDER BY CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id
    LOOP
        EXIT WHEN p_tokens <= 0;
        part := LEAST(pkg.free, p_tokens);
        UPDATE packages SET tokens_used = tokens_used + part WHERE id = pkg.id;
        p_tokens := p_tokens - part;
    END LOOP;
    RETURN GREATEST(p_tokens, 0);
END $$
"""

# Ledger.reserve: hold `p_tokens` of the tenant's live packages for the request.
_RESERVE = """
CREATE OR REPLACE FUNCTION factory_reserve(
    p_request text, p_tenant text, p_tokens bigint, p_expires_at text, p_now text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    tid integer;
    ids integer[];
    frees bigint[];
    available bigint;
    part bigint;
    seq integer := 0;
BEGIN
    SELECT id INTO tid FROM tenants WHERE name = p_tenant FOR UPDATE;
    IF tid IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'LF001', MESSAGE = p_tenant;
    END IF;
    IF EXISTS (SELECT 1 FROM reservations WHERE request_id = p_request
               UNION ALL SELECT 1 FROM usage WHERE request_id = p_request) THEN
        RAISE EXCEPTION USING ERRCODE = 'LF002', MESSAGE = p_request;
    END IF;
    -- The live packages with tokens free, in the spend order (schema.SPEND_ORDER), in one scan.
    SELECT array_agg(p.id ORDER BY CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id),
           array_agg(p.tokens_total - p.tokens_used - p.tokens_reserved
                     ORDER BY CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id),
           COALESCE(SUM(p.tokens_total - p.tokens_used - p.tokens_reserved), 0)
    INTO ids, frees, available
    FROM packages p
    WHERE p.tenant_id = tid AND (p.expires_at IS NULL OR p.expires_at > p_now)
      AND p.tokens_total - p.tokens_used - p.tokens_reserved > 0;
    IF available < p_tokens THEN
        RAISE EXCEPTION USING ERRCODE = 'LF003', MESSAGE = available::text;
    END IF;
    INSERT INTO reservations (request_id, tenant_id, tokens, expires_at, created_at)
    VALUES (p_request, tid, p_tokens, p_expires_at, p_now);
    WHILE p_tokens > 0 LOOP
        seq := seq + 1;
        part := LEAST(frees[seq], p_tokens);
        UPDATE packages SET tokens_reserved = tokens_reserved + part WHERE id = ids[seq];
        INSERT INTO reservation_parts (request_id, seq, package_id, tokens) VALUES (p_request, seq - 1, ids[seq], part);
        p_tokens := p_tokens - part;
    END LOOP;
END $$
"""

# settlement.settle: charge what the request used (`p_billed` factory tokens); the usage row, as
# schema.USAGE_SQL selects it. Since migration 3 (one token unit, metering/rates.py).
_SETTLE = """
CREATE OR REPLACE FUNCTION factory_settle(
    p_request text, p_tenant text, p_prompt bigint, p_completion bigint, p_energy_j double precision,
    p_source text, p_cost text, p_currency text, p_model text, p_replica text, p_status text,
    p_started_at text, p_finished_at text, p_reserved boolean, p_now text, p_cached bigint, p_billed bigint
) RETURNS TABLE (
    o_request text, o_tenant text, o_model text, o_replica text, o_prompt bigint, o_completion bigint,
    o_overage bigint, o_energy_j double precision, o_source text, o_cost text, o_currency text,
    o_status text, o_started_at text, o_finished_at text, o_cached bigint, o_billed bigint
) LANGUAGE plpgsql AS $$
DECLARE
    owner_id integer;
    holder text;
    remaining bigint;
    overage bigint := 0;
    part record;
    charge bigint;
BEGIN
    PERFORM 1 FROM tenants WHERE name = p_tenant FOR UPDATE;
    IF NOT EXISTS (SELECT 1 FROM usage WHERE request_id = p_request) THEN
        SELECT r.tenant_id, t.name INTO owner_id, holder
        FROM reservations r JOIN tenants t ON t.id = r.tenant_id WHERE r.request_id = p_request;
        IF owner_id IS NULL AND NOT p_reserved THEN
            -- never reserved (auth disabled): nothing to charge, only to record
            INSERT INTO tenants (name, priority, created_at) VALUES (p_tenant, 'standard', p_now)
            ON CONFLICT (name) DO NOTHING;
            SELECT id INTO owner_id FROM tenants WHERE name = p_tenant;
        ELSIF owner_id IS NULL THEN
            -- reserved once, but the reservation expired before this settlement
            SELECT id INTO owner_id FROM tenants WHERE name = p_tenant;
            IF owner_id IS NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'LF001', MESSAGE = p_tenant;
            END IF;
            overage := factory_charge_available(owner_id, p_billed, p_finished_at);
        ELSE
            IF holder <> p_tenant THEN
                RAISE EXCEPTION USING ERRCODE = 'LF004',
                    MESSAGE = 'request ' || quote_literal(p_request) || ' was reserved for ' || quote_literal(holder)
                              || ', not ' || quote_literal(p_tenant);
            END IF;
            remaining := p_billed;
            FOR part IN SELECT package_id, tokens FROM reservation_parts WHERE request_id = p_request ORDER BY seq
            LOOP
                charge := LEAST(remaining, part.tokens);
                UPDATE packages SET tokens_reserved = tokens_reserved - part.tokens,
                                    tokens_used = tokens_used + charge
                WHERE id = part.package_id;
                remaining := remaining - charge;
            END LOOP;
            DELETE FROM reservation_parts WHERE request_id = p_request;
            DELETE FROM reservations WHERE request_id = p_request;
            IF remaining > 0 THEN  -- used more than reserved: take the excess from what is still available
                overage := factory_charge_available(owner_id, remaining, p_finished_at);
            END IF;
        END IF;
        INSERT INTO usage (request_id, tenant_id, model, replica, prompt_tokens, completion_tokens,
                           overage_tokens, energy_j, energy_source, cost, currency, status, started_at,
                           finished_at, cached_tokens, billed_tokens)
        VALUES (p_request, owner_id, p_model, p_replica, p_prompt, p_completion, overage, p_energy_j,
                p_source, p_cost, p_currency, p_status, p_started_at, p_finished_at, p_cached, p_billed);
    END IF;
    RETURN QUERY
        SELECT u.request_id, t.name, u.model, u.replica, u.prompt_tokens, u.completion_tokens,
               u.overage_tokens, u.energy_j, u.energy_source, u.cost, u.currency, u.status, u.started_at,
               u.finished_at, u.cached_tokens, u.billed_tokens
        FROM usage u JOIN tenants t ON t.id = u.tenant_id WHERE u.request_id = p_request;
END $$
"""

# Migration 4 (plans and categories): a request spends only the packages that cover its model's
# category (schema.COVERS; a null category: any), and a trial is spent first (schema.SPEND_ORDER).
# The same functions as above with that filter and order and one argument more each.
_ORDER_V4 = (
    "CASE WHEN p.kind = 'trial' THEN 0 ELSE 1 END, CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id"
)
_COVERS_V4 = "(p_category IS NULL OR p.category IS NULL OR p.category = p_category)"


def _v4(ddl: str, signature: str, new_signature: str) -> str:
    ddl = ddl.replace(signature, new_signature)
    ddl = ddl.replace("CASE WHEN p.expires_at IS NULL THEN 1 ELSE 0 END, p.expires_at, p.id", _ORDER_V4)
    ddl = ddl.replace(
        "(p.expires_at IS NULL OR p.expires_at > ", f"{_COVERS_V4} AND (p.expires_at IS NULL OR p.expires_at > "
    )
    return ddl


_CHARGE_AVAILABLE_V4 = _v4(
    _CHARGE_AVAILABLE,
    "(p_tenant_id integer, p_tokens bigint, p_at text)",
    "(p_tenant_id integer, p_tokens bigint, p_at text, p_category text)",
)
_RESERVE_V4 = _v4(
    _RESERVE,
    "p_request text, p_tenant text, p_tokens bigint, p_expires_at text, p_now text\n",
    "p_request text, p_tenant text, p_tokens bigint, p_expires_at text, p_now text, p_category text\n",
)


def _settle_v4() -> str:
    """v3's settle, charging only packages that cover the category and recording it on the row."""
    ddl = _v4(
        _SETTLE,
        "p_now text, p_cached bigint, p_billed bigint\n",
        "p_now text, p_cached bigint, p_billed bigint, p_category text\n",
    )
    for old, new in (
        ("p_finished_at);", "p_finished_at, p_category);"),  # both factory_charge_available calls
        ("o_cached bigint, o_billed bigint\n", "o_cached bigint, o_billed bigint, o_category text\n"),
        ("finished_at, cached_tokens, billed_tokens)", "finished_at, cached_tokens, billed_tokens, category)"),
        ("p_finished_at, p_cached, p_billed);", "p_finished_at, p_cached, p_billed, p_category);"),
        (
            "u.finished_at, u.cached_tokens, u.billed_tokens\n",
            "u.finished_at, u.cached_tokens, u.billed_tokens, u.category\n",
        ),
    ):
        assert old in ddl, old
        ddl = ddl.replace(old, new)
    return ddl


_SETTLE_V4 = _settle_v4()

# psycopg's own placeholders: these go straight to the driver (store.Calls).
RESERVE_CALL = "SELECT factory_reserve(%s, %s, %s, %s, %s, %s)"
SETTLE_CALL = "SELECT * FROM factory_settle(" + ", ".join(["%s"] * 18) + ")"


_V2_SETTLE_SIGNATURE = (
    "factory_settle(text, text, bigint, bigint, double precision, text, text, text, text, text, text, text, text,"
    " boolean, text)"
)
MIGRATIONS = {
    # Schema v2 also had a factory_settle charging the raw count (15 arguments); a ledger opened
    # by this factory goes on to v3 in the same run, so only migration 3 creates the function,
    # and drops the v2 one where a ledger was left at v2 by an older factory.
    2: (_CHARGE_AVAILABLE, _RESERVE),
    3: (f"DROP FUNCTION IF EXISTS {_V2_SETTLE_SIGNATURE}", _SETTLE),
    4: (
        "DROP FUNCTION factory_reserve(text, text, bigint, text, text)",
        "DROP FUNCTION factory_settle(text, text, bigint, bigint, double precision, text, text, text, text, text,"
        " text, text, text, boolean, text, bigint, bigint)",
        "DROP FUNCTION factory_charge_available(integer, bigint, text)",
        _CHARGE_AVAILABLE_V4,
        _RESERVE_V4,
        _SETTLE_V4,
    ),
}


def install(conn, version: int) -> None:
    """The functions' part of migration `version` on PostgreSQL (SQLite has no stored procedures;
    it runs settlement.py)."""
    if conn.dialect.name != "postgresql":
        return
    for ddl in MIGRATIONS[version]:
        conn.exec_driver_sql(ddl)


def refusal(
    err: Exception, *, request_id: str = "", tenant: str = "", tokens: int = 0, category: str | None = None
) -> LedgerError | None:
    """The ledger exception a function's error stands for; None if it is not one of ours. The
    functions put the one value each needs in the message: the tenant, the request id, the
    tokens available, or the whole sentence."""
    state = getattr(err, "sqlstate", None)
    if state == "23505":  # unique_violation: the same request id reserved at once by another caller
        return LedgerError(f"request {request_id!r} is already reserved or settled")
    if state is None or not state.startswith("LF"):
        return None
    message = err.diag.message_primary or ""
    if state == UNKNOWN_TENANT:
        return UnknownTenant(message)
    if state == TAKEN:
        return LedgerError(f"request {message!r} is already reserved or settled")
    if state == QUOTA:
        return QuotaExceeded(available=int(message), requested=tokens, tenant=tenant, category=category)
    return LedgerError(message)
