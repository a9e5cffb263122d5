-- Fleet operations (issue #19): the audit log, indexes for paginated device lists, and when
-- each admin last logged in and each API token was last used.

-- Every administrative change, appended in the transaction that made it; nothing updates or
-- deletes a row.  id is assigned as max(id) + 1 by the serialised writer (db.transaction),
-- so ids are gapless and in commit order without an engine-specific serial column.
CREATE TABLE audit_log (
    id BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,                     -- admin, token:NAME, device:cpk_…, cli:USER or oracle
    via TEXT NOT NULL,                       -- session, token, device, cli or internal
    address TEXT NOT NULL DEFAULT '',        -- the client address (behind trusted proxies)
    action TEXT NOT NULL,                    -- e.g. device.revoke, group.member.add
    target TEXT NOT NULL DEFAULT '',         -- a device key, group id, admin or token name
    detail TEXT NOT NULL DEFAULT '{}'        -- JSON object: what changed
);
CREATE INDEX audit_log_by_target ON audit_log (target, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);

-- Keyset pagination: each sort order is an index walk from the cursor.
CREATE INDEX devices_by_name ON devices (name, key);
CREATE INDEX devices_by_enrolled ON devices (enrolled_at_ms, key);

ALTER TABLE admins ADD COLUMN last_login_ms BIGINT;
ALTER TABLE api_tokens ADD COLUMN last_used_ms BIGINT;
