-- MySQL/MariaDB only (their default collation ignored case in Idempotency-Keys);
-- postgres already compares text exactly.
SELECT 1;
