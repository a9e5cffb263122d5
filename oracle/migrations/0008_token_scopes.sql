-- API token scopes and creators (audit F1: every token was a full administrator).
--
-- scope: read (GET only: the API's reads and /metrics) or write (also device and group
-- changes).  No token manages admins or tokens, whatever its scope (auth.refusal).  Tokens
-- that exist before this migration get write: it is exactly what they did for devices and
-- groups until now, so the scripts using them (CI enrolling devices, the reissue after a
-- restore) keep working; they lose only the admin and token routes.  An operator narrows
-- one (a Prometheus scrape token) by making a read token and revoking the old one.
ALTER TABLE api_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'write'
    CHECK (scope IN ('read', 'write'));

-- created_by: the admin whose session made the token; deleting that admin revokes it in the
-- same transaction (auth.delete_admin).  NULL: made by the CLI (whoever runs it holds the
-- database), or made before this migration by anything but an admin's session.  The foreign
-- key has no ON DELETE action: an admin row cannot go while a token still names it, so no
-- path that forgets the revocation can leave a dead admin's token working.
ALTER TABLE api_tokens ADD COLUMN created_by TEXT REFERENCES admins (username);

-- Existing tokens: the creator is the admin whose session the audit log names on the token's
-- newest token.create entry (a name is reused only after a revoke), if that admin still exists.
UPDATE api_tokens SET created_by = (
    SELECT made.actor FROM audit_log made
    WHERE made.action = 'token.create' AND made.via = 'session' AND made.target = api_tokens.name
      AND made.actor IN (SELECT username FROM admins)
      AND made.id = (SELECT MAX(newest.id) FROM audit_log newest
                     WHERE newest.action = 'token.create' AND newest.target = api_tokens.name)
);
CREATE INDEX api_tokens_by_creator ON api_tokens (created_by);
