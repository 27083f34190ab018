-- Times are Unix milliseconds (BIGINT) in every dialect; prices are integer cents.
CREATE TABLE users (
    id            BIGINT AUTO_INCREMENT PRIMARY KEY,
    username      VARCHAR(64)  NOT NULL UNIQUE,
    password_hash VARCHAR(255) NOT NULL,
    role          VARCHAR(16)  NOT NULL DEFAULT 'customer' CHECK (role IN ('customer', 'admin')),
    created_at    BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE products (
    id         BIGINT AUTO_INCREMENT PRIMARY KEY,
    name       VARCHAR(200) NOT NULL,
    category   VARCHAR(64)  NOT NULL,
    status     VARCHAR(16)  NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    price      BIGINT       NOT NULL CHECK (price >= 0),
    stock      BIGINT       NOT NULL CHECK (stock >= 0),
    version    BIGINT       NOT NULL DEFAULT 0,
    created_at BIGINT       NOT NULL,
    updated_at BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
CREATE INDEX idx_products_category_status ON products (category, status);
CREATE INDEX idx_products_price ON products (price);
CREATE INDEX idx_products_created_at ON products (created_at);

CREATE TABLE cart_items (
    user_id    BIGINT NOT NULL REFERENCES users (id),
    product_id BIGINT NOT NULL REFERENCES products (id),
    quantity   BIGINT NOT NULL CHECK (quantity > 0),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, product_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE orders (
    id         BIGINT      PRIMARY KEY,
    order_no   VARCHAR(32) NOT NULL UNIQUE,
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    status     VARCHAR(16) NOT NULL DEFAULT 'created',
    total      BIGINT      NOT NULL CHECK (total >= 0),
    created_at BIGINT      NOT NULL,
    updated_at BIGINT      NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
CREATE INDEX idx_orders_user_status_created ON orders (user_id, status, created_at);
CREATE INDEX idx_orders_user_id ON orders (user_id, id);

CREATE TABLE order_items (
    order_id   BIGINT       NOT NULL REFERENCES orders (id),
    product_id BIGINT       NOT NULL REFERENCES products (id),
    name       VARCHAR(200) NOT NULL,
    unit_price BIGINT       NOT NULL,
    quantity   BIGINT       NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
CREATE INDEX idx_order_items_product ON order_items (product_id);

CREATE TABLE idempotency_keys (
    user_id      BIGINT       NOT NULL,
    idem_key     VARCHAR(255) NOT NULL,
    request_hash VARCHAR(64)  NOT NULL,
    order_id     BIGINT       NOT NULL,
    created_at   BIGINT       NOT NULL,
    PRIMARY KEY (user_id, idem_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
