-- One worldwide network (issue #17, SPEC §19): the region whose store holds each device's
-- mailbox, and, after a move, the region it moved from and when (mail may still wait there:
-- the access list names that former home for `--home-move-drain-s` after the move, and relays
-- move what waits there into the new home).  NULL home: the oracle's own region, filled in at
-- start once regions are configured.
ALTER TABLE devices ADD COLUMN home_region TEXT;
ALTER TABLE devices ADD COLUMN former_region TEXT;
ALTER TABLE devices ADD COLUMN moved_at_ms BIGINT;
