-- 0005: each process counts into rows of its own. With one row per sender and hour, every
-- commit of every process sending through a sender updated the same row: one process frozen
-- between that update and its commit held up every other one's commits, and their leases
-- with them, until the server ended its transaction. sent_since sums the writers.
ALTER TABLE sender_usage ADD COLUMN writer TEXT COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE sender_usage DROP CONSTRAINT sender_usage_pkey;
ALTER TABLE sender_usage ADD PRIMARY KEY (sender, hour, writer);
