-- Presence (issue #19, SPEC §20): what relays report about enrolled devices' connections, and
-- the expected check-in intervals that make a device silent.

-- Relay processes that report (replicas share a relay key, so each process draws an instance
-- id).  A process whose lease passes unheard is taken for dead: its open connections end.
CREATE TABLE relay_instances (
    instance TEXT PRIMARY KEY,               -- hex of the 16-byte id the process drew at start
    relay_key TEXT NOT NULL,                 -- cpk_… of the key that signed its reports
    first_heard_ms BIGINT NOT NULL,
    last_heard_ms BIGINT NOT NULL,
    lease_until_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,                -- the lease its last report asked for
    last_sequence BIGINT NOT NULL,           -- of the last report applied
    snapshot_from BIGINT,                    -- the snapshot being received, NULL: none
    gone INTEGER NOT NULL DEFAULT 0          -- 1 once its lease passed and its connections ended
);
CREATE INDEX relay_instances_by_lease ON relay_instances (gone, lease_until_ms);

-- One row per connection a relay reported: the presence history (the newest per device are
-- kept) and, with counts cumulative per connection, what makes a repeated report harmless.
CREATE TABLE presence_history (
    device_key TEXT NOT NULL REFERENCES devices (key) ON DELETE CASCADE,
    instance TEXT NOT NULL,
    connected_at_ms BIGINT NOT NULL,         -- relay clock
    relay_key TEXT NOT NULL,
    disconnected_at_ms BIGINT,               -- NULL: open as far as the oracle knows
    sent BIGINT NOT NULL DEFAULT 0,
    received BIGINT NOT NULL DEFAULT 0,
    refused BIGINT NOT NULL DEFAULT 0,
    confirmed_sequence BIGINT NOT NULL,      -- the last report of its instance that listed it
    PRIMARY KEY (device_key, instance, connected_at_ms)
);
CREATE INDEX presence_history_open ON presence_history (instance, disconnected_at_ms);

-- Each device's presence now, derived from its history: the open connection that began last,
-- else when the last one ended; and the message totals of every connection ever reported.
CREATE TABLE device_presence (
    device_key TEXT PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    online INTEGER NOT NULL DEFAULT 0,
    relay_key TEXT,                          -- of the current connection (NULL: offline)
    instance TEXT,
    connected_at_ms BIGINT,
    last_seen_ms BIGINT NOT NULL,            -- the last time a relay held it (report time if online)
    sent BIGINT NOT NULL DEFAULT 0,
    received BIGINT NOT NULL DEFAULT 0,
    refused BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX device_presence_online ON device_presence (online, device_key);

-- Expected check-in intervals: a device's own wins, else the shortest of its groups'.
CREATE TABLE device_checkin (
    device_key TEXT PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    interval_s BIGINT NOT NULL
);
CREATE TABLE group_checkin (
    group_id TEXT PRIMARY KEY REFERENCES peer_groups (id) ON DELETE CASCADE,
    interval_s BIGINT NOT NULL
);

-- Devices silent now: offline for longer than their interval (set by the silence watch).
CREATE TABLE silent_devices (
    device_key TEXT PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    since_ms BIGINT NOT NULL,                -- when the watch found it silent
    last_seen_ms BIGINT,                     -- its last contact then (NULL: never connected)
    interval_s BIGINT NOT NULL
);
