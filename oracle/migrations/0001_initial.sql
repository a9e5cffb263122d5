-- Devices, peer groups, the peer-change outbox, the access-list counter and admin auth.
-- Portable SQL: the same text runs on SQLite and PostgreSQL (no serials, no booleans, no blobs).

CREATE TABLE devices (
    key TEXT PRIMARY KEY,                    -- cpk_… text form, the one spelling everywhere
    name TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '',           -- space-separated, lower case
    enrolled_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT,                    -- NULL: active
    last_seen_ms BIGINT,                     -- last receipt from the device
    peer_version BIGINT NOT NULL DEFAULT 0,  -- newest peer-change version issued, never reused
    acked_version BIGINT NOT NULL DEFAULT 0  -- newest version the device acknowledged
);

CREATE TABLE peer_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE memberships (
    group_id TEXT NOT NULL REFERENCES peer_groups (id) ON DELETE CASCADE,
    device_key TEXT NOT NULL REFERENCES devices (key) ON DELETE CASCADE,
    PRIMARY KEY (group_id, device_key)
);
CREATE INDEX memberships_by_device ON memberships (device_key);

-- One row per issued peer-change version: the outbox until sent, then the record acks match.
CREATE TABLE peer_changes (
    device_key TEXT NOT NULL REFERENCES devices (key) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    peers TEXT NOT NULL,                     -- space-separated cpk_… keys, sorted
    created_at_ms BIGINT NOT NULL,
    envelope TEXT,                           -- base64 of the sealed envelope once built
    msg_id TEXT,                             -- hex, to match the device's receipt
    sent_at_ms BIGINT,                       -- a relay said ACCEPTED
    acked_at_ms BIGINT,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (device_key, version)
);
CREATE INDEX peer_changes_unsent ON peer_changes (sent_at_ms, created_at_ms);
CREATE INDEX peer_changes_by_msg_id ON peer_changes (msg_id);

CREATE TABLE access_list_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO access_list_state (id, version) VALUES (1, 1);

CREATE TABLE admins (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE admin_sessions (
    token_hash TEXT PRIMARY KEY,             -- SHA-256 of the cookie value: a database leak is no login
    username TEXT NOT NULL REFERENCES admins (username) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);
