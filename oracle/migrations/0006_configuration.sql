-- Configuration (issue #16, SPEC §21): a desired JSON document per peer group and per device,
-- merged into one per device (groups in name order, then the device's own, deep), and the
-- newest merged document issued to each device, which is the outbox until a relay stores it.
-- Each device counts its documents (config_version, never reused, carried over by a key
-- rotation) and keeps the newest report it sent: the stamp it applied and its reported state.

CREATE TABLE group_configs (
    group_id TEXT PRIMARY KEY REFERENCES peer_groups (id) ON DELETE CASCADE,
    document TEXT NOT NULL,                  -- a JSON object, in its canonical spelling
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE device_configs (
    device_key TEXT PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    document TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- One row per device: the newest merged document issued (superseded ones are never sent).
CREATE TABLE config_pushes (
    device_key TEXT PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    epoch BIGINT NOT NULL,
    version BIGINT NOT NULL,
    document TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    envelope TEXT,                           -- base64 of the sealed envelope once built
    sent_at_ms BIGINT,                       -- a relay said ACCEPTED
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX config_pushes_unsent ON config_pushes (sent_at_ms, created_at_ms);

ALTER TABLE devices ADD COLUMN config_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN reported_config_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN reported_config_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN reported_config TEXT;
ALTER TABLE devices ADD COLUMN reported_config_at_ms BIGINT;
