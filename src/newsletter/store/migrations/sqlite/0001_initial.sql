-- 0001: the schema of the first release, as it stood when numbered migrations began.
-- IF NOT EXISTS throughout: a database made before numbered migrations already has these
-- tables (or most of them), and this runs on it again to add any that are missing.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feeds (
    url TEXT PRIMARY KEY,
    fetch_url TEXT, etag TEXT, last_modified TEXT, title TEXT, link TEXT,
    last_checked TEXT, last_ok TEXT, last_status TEXT, last_error TEXT,
    consecutive_errors INTEGER NOT NULL DEFAULT 0, error_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feed_url TEXT NOT NULL, key TEXT NOT NULL,
    title TEXT NOT NULL, link TEXT NOT NULL, summary_html TEXT NOT NULL, author TEXT NOT NULL,
    published TEXT NOT NULL, first_seen TEXT NOT NULL, image_url TEXT NOT NULL,
    categories TEXT NOT NULL,
    backlog INTEGER NOT NULL DEFAULT 0,  -- history seen on a feed's first fetch; never mailed
    UNIQUE (feed_url, key)
);
CREATE TABLE IF NOT EXISTS issues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule TEXT NOT NULL, number INTEGER NOT NULL, created_at TEXT NOT NULL,
    status TEXT NOT NULL,             -- sending | complete
    entry_watermark INTEGER NOT NULL, -- entries up to this id were considered for this issue
    entry_ids TEXT NOT NULL, subject TEXT NOT NULL,
    payload TEXT NOT NULL,            -- the rendered issue, so a resumed send is identical
    UNIQUE (schedule, number)
);
CREATE TABLE IF NOT EXISTS deliveries (
    issue_id INTEGER NOT NULL REFERENCES issues(id),
    recipient TEXT NOT NULL,          -- lower-cased address
    status TEXT NOT NULL,             -- pending | sent | failed | skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (issue_id, recipient)
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (issue_id, status);
CREATE TABLE IF NOT EXISTS suppressions (
    list_name TEXT NOT NULL, address TEXT NOT NULL,  -- lower-cased
    created_at TEXT NOT NULL, source TEXT NOT NULL,   -- e.g. one-click, page, cli
    PRIMARY KEY (list_name, address)
);
CREATE TABLE IF NOT EXISTS posts (       -- the ledger of webhook posts, as deliveries is of email
    target TEXT NOT NULL, item_id TEXT NOT NULL, schedule TEXT NOT NULL,
    kind TEXT NOT NULL, ref INTEGER NOT NULL,  -- article: entries.id; issue: issues.id
    status TEXT NOT NULL,                      -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
    location TEXT NOT NULL DEFAULT '',         -- where the target says it landed
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (target, item_id)
);
CREATE TABLE IF NOT EXISTS targets (     -- webhook targets switched off (410 Gone, bad credentials)
    name TEXT PRIMARY KEY, reason TEXT NOT NULL, fingerprint TEXT NOT NULL, disabled_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriber_lists (  -- the checked copy of subscribers/NAME.csv
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,             -- fingerprint of the file it was read from
    generation INTEGER NOT NULL, problems TEXT NOT NULL, loaded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscribers (
    list_name TEXT NOT NULL, generation INTEGER NOT NULL,
    key TEXT NOT NULL,                -- lower-cased address, as in deliveries.recipient
    email TEXT NOT NULL, raw TEXT NOT NULL, name TEXT NOT NULL, fields TEXT NOT NULL,
    line INTEGER NOT NULL,
    PRIMARY KEY (list_name, generation, key)
);
CREATE INDEX IF NOT EXISTS subscribers_raw ON subscribers (list_name, generation, raw);
CREATE INDEX IF NOT EXISTS subscribers_line ON subscribers (list_name, generation, line);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, acquired_at TEXT NOT NULL, expires_at TEXT NOT NULL
);
