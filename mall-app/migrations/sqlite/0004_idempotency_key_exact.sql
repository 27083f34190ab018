-- MySQL/MariaDB only (their default collation ignored case in Idempotency-Keys);
-- sqlite already compares text exactly.
SELECT 1;
