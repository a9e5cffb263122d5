-- Key rotation (SPEC §15).  A device that rotates keeps its place under its new key: a new row
-- with the old row's name, tags, groups and peer-list count, while the old row is revoked and
-- names its successor; the old key may still fetch its mailbox until drain_until_ms.
-- oracle_key is the oracle key a device confirmed it follows (a receipt for the chain notice);
-- NULL: not confirmed since the oracle last rotated, or never needed.
ALTER TABLE devices ADD COLUMN rotated_to TEXT;
ALTER TABLE devices ADD COLUMN rotated_from TEXT;
ALTER TABLE devices ADD COLUMN drain_until_ms BIGINT;
ALTER TABLE devices ADD COLUMN oracle_key TEXT;
