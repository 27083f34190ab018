-- Idempotency-Keys are compared exactly (draft-ietf-httpapi-idempotency-key-header: the key is an
-- opaque string). Under the table's default utf8mb4 collation MySQL/MariaDB compared them without
-- case, so `ABC` after `abc` replayed the first order instead of placing a new one. Trailing
-- spaces (which a PAD SPACE collation also ignores) cannot arrive: HTTP trims field values.
ALTER TABLE idempotency_keys MODIFY idem_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
