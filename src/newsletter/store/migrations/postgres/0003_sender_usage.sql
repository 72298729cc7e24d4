-- 0003: messages each sender handed over, per UTC hour, so a daily quota counts across restarts.
CREATE TABLE sender_usage (
    sender TEXT COLLATE "C" NOT NULL,
    hour TEXT COLLATE "C" NOT NULL,   -- UTC 'YYYY-MM-DDTHH', the hour the messages went in
    sent INTEGER NOT NULL,
    PRIMARY KEY (sender, hour)
);
