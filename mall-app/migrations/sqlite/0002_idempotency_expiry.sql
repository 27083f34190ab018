-- Expired Idempotency-Keys are deleted in the background by age (MALL_IDEMPOTENCY_KEY_TTL_SECS).
CREATE INDEX idx_idempotency_keys_created ON idempotency_keys (created_at);
