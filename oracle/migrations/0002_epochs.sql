-- Epochs (SPEC §12): every oracle start begins a new one, at least one more than the last
-- recorded here, so lists issued after this database was restored from a backup outrank the
-- lists issued before.  Each peer-change row keeps the epoch it was issued in, so a retry
-- after a restart re-seals the same (epoch, version).
ALTER TABLE access_list_state ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE peer_changes ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
