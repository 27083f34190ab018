-- Invalidation records: each write that changes cached objects inserts one in its own
-- transaction (the keys it changed), and every instance follows them by sequence
-- (src/invalidation.rs). AUTOINCREMENT: a sequence number is never reused.
CREATE TABLE cache_invalidations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    cache_keys VARCHAR(7900) NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX idx_cache_invalidations_created ON cache_invalidations (created_at);
