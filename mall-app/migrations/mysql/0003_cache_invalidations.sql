-- Invalidation records: each write that changes cached objects inserts one in its own
-- transaction (the keys it changed), and every instance follows them by sequence
-- (src/invalidation.rs).
CREATE TABLE cache_invalidations (
    seq        BIGINT      NOT NULL AUTO_INCREMENT PRIMARY KEY,
    cache_keys VARCHAR(7900) NOT NULL,
    created_at BIGINT      NOT NULL,
    INDEX idx_cache_invalidations_created (created_at)
) ENGINE = InnoDB;
