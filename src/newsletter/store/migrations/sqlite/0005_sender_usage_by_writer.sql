-- 0005: each process counts into rows of its own (see the PostgreSQL migration: a frozen
-- process held the one shared row). SQLite cannot change a primary key in place.
CREATE TABLE sender_usage_new (
    sender TEXT NOT NULL,
    hour TEXT NOT NULL,               -- UTC 'YYYY-MM-DDTHH', the hour the messages went in
    writer TEXT NOT NULL DEFAULT '',  -- host:pid of the process that counted them
    sent INTEGER NOT NULL,
    PRIMARY KEY (sender, hour, writer)
);
INSERT INTO sender_usage_new (sender, hour, writer, sent) SELECT sender, hour, '', sent FROM sender_usage;
DROP TABLE sender_usage;
ALTER TABLE sender_usage_new RENAME TO sender_usage;
