-- Invalidation records: each write that changes cached objects inserts one in its own
-- transaction (the keys it changed) and notifies `mall_cache`; every instance follows them by
-- sequence (src/invalidation.rs).
CREATE TABLE cache_invalidations (
    seq        BIGSERIAL PRIMARY KEY,
    cache_keys VARCHAR(7900) NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX idx_cache_invalidations_created ON cache_invalidations (created_at);
