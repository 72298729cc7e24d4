-- 0004: several daemons on one database. A due time fires once (fires), and an issue's
-- pending deliveries are claimed in batches under a lease (batches, deliveries.claimed_by).
CREATE TABLE fires (
    job TEXT NOT NULL,                -- digest:NAME, poll, post:NAME
    fire_at TEXT NOT NULL,            -- the due time, or the start of the interval's slot (UTC)
    host TEXT NOT NULL,               -- the daemon that fired it
    fired_at TEXT NOT NULL,
    PRIMARY KEY (job, fire_at)
);
CREATE TABLE batches (
    id TEXT PRIMARY KEY,              -- the attempt: host:pid:nonce; marks are fenced by it
    issue_id INTEGER NOT NULL REFERENCES issues(id),
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    claimed_at REAL NOT NULL,         -- the database's clock, Unix seconds
    lease_until REAL NOT NULL,        -- past this the rows are anyone's again
    size INTEGER NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0    -- as the holder last said, for status
);
ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;  -- batches.id while a batch holds the row
-- A claim searches only the rows nobody holds; a release or a reaper only the rows still
-- held (a row keeps the id of the batch that sent it, outside both indexes).
CREATE INDEX deliveries_free ON deliveries (issue_id, recipient)
    WHERE status = 'pending' AND claimed_by IS NULL;
CREATE INDEX deliveries_claimed ON deliveries (claimed_by)
    WHERE status = 'pending' AND claimed_by IS NOT NULL;
