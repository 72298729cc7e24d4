-- 0002: how long a feed asks to be left alone (RSS <ttl>), in minutes; NULL when it does not ask.
ALTER TABLE feeds ADD COLUMN ttl INTEGER;
