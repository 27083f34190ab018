//! Typed configuration: command-line flags, each with an `MALL_*` environment variable.
//!
//! `mall-app serve --help` lists every setting with its default. Values left unset are derived
//! from the container's limits by [`crate::tuning`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::tuning::{self, Resources, Tuning};

#[derive(Debug, Parser)]
#[command(name = "mall-app", version, about = "The bundled mall: catalog, cart and orders.")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand, `mall-app` serves with these settings.
    #[command(flatten)]
    pub serve: Box<ServeArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Apply migrations and seed products and users idempotently, then exit.
    Seed {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        seed: SeedArgs,
    },
    /// Apply migrations, then exit.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Primary database URL (postgres://, mysql://, sqlite://). Unset: SQLite in --data-dir.
    #[arg(long, env = "MALL_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Read replicas, comma-separated. Reads go round-robin over the healthy ones.
    #[arg(long, env = "MALL_DATABASE_REPLICA_URLS", value_delimiter = ',')]
    pub replica_urls: Vec<String>,
    /// Where the embedded SQLite database lives when no URL is given.
    #[arg(long, env = "MALL_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Primary pool size. Default: 10 per CPU, 10..=150 (seed 000: 150 open).
    #[arg(long, env = "MALL_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
    /// Primary connections kept open while idle. Default: 2 per CPU, at most 30 (seed 000).
    #[arg(long, env = "MALL_DB_MIN_CONNECTIONS")]
    pub db_min_connections: Option<u32>,
    /// Pool size per replica. Default: 8 per CPU, 8..=100 (seed 000: 100 open).
    #[arg(long, env = "MALL_DB_REPLICA_MAX_CONNECTIONS")]
    pub db_replica_max_connections: Option<u32>,
    /// Replica connections kept open while idle. Default: 2 per CPU, at most 20 (seed 000).
    #[arg(long, env = "MALL_DB_REPLICA_MIN_CONNECTIONS")]
    pub db_replica_min_connections: Option<u32>,
    /// A file (JSON, `{"primary": 10, "replicas": 8}`) with the connections this pod may hold
    /// open, read at start and again whenever it changes: the operator mounts its share of the
    /// database's connection budget here, so a new `maxReplicas` resizes running pools instead
    /// of restarting the pods. The pool sizes above stay the ceilings. With a file, pools keep no
    /// minimum open (a minimum above a smaller share would hold connections the share forbids).
    #[arg(long, env = "MALL_DB_ALLOWANCE_FILE")]
    pub db_allowance_file: Option<PathBuf>,
    /// How long a request waits for a pooled connection before failing with 503.
    #[arg(long, env = "MALL_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 3000)]
    pub db_acquire_timeout_ms: u64,
    /// Idle connections above the minimum are closed after this long (seed 000: 30 min).
    #[arg(long, env = "MALL_DB_IDLE_TIMEOUT_SECS", default_value_t = 1800)]
    pub db_idle_timeout_secs: u64,
    /// Connections are recycled after this long (seed 000: 1 h).
    #[arg(long, env = "MALL_DB_MAX_LIFETIME_SECS", default_value_t = 3600)]
    pub db_max_lifetime_secs: u64,
    /// A replica whose oldest unreplayed write (of those this instance knows) has waited longer
    /// than this leaves the read rotation until it catches up; until then its reads go to the
    /// others or the primary. Reads a replica has not replayed the write for go to the primary
    /// whatever the bound (docs/app.md, "Consistency").
    #[arg(long, env = "MALL_DB_REPLICA_MAX_LAG_MS", default_value_t = 3000)]
    pub db_replica_max_lag_ms: u64,
    /// Statements at least this slow are logged with their name and text, and on PostgreSQL
    /// their plan once (0: off). Every statement is timed in `db_statement_duration_seconds`.
    #[arg(long, env = "MALL_DB_SLOW_MS", default_value_t = crate::telemetry::DEFAULT_SLOW_MS)]
    pub db_slow_ms: u64,
    /// How often replicas are health-checked.
    #[arg(long, env = "MALL_DB_REPLICA_CHECK_SECS", default_value_t = 5)]
    pub db_replica_check_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// Products to seed, with ids 1..=N (seed 001's wrk script reads /api/products/{1..1000}).
    #[arg(long = "seed-products", env = "MALL_SEED_PRODUCTS", default_value_t = 1000)]
    pub products: u32,
    /// Customers to seed: user1..userM.
    #[arg(long = "seed-users", env = "MALL_SEED_USERS", default_value_t = 100)]
    pub users: u32,
    /// Stock each seeded product starts with.
    #[arg(long = "seed-stock", env = "MALL_SEED_STOCK", default_value_t = 10_000)]
    pub stock: i64,
    /// Password of the seeded users and of `admin`. Refused in production unless set.
    #[arg(long = "seed-password", env = "MALL_SEED_PASSWORD", default_value = "mall-password")]
    pub password: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "MALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Also listen on this Unix domain socket (the sidecar in the same pod reaches the app through
    /// it, in a shared emptyDir). A stale socket file left by a previous run is replaced.
    #[arg(long, env = "MALL_LISTEN_SOCKET")]
    pub listen_socket: Option<std::path::PathBuf>,
    /// A private admin port (e.g. `127.0.0.1:9902`) serving profiles on demand:
    /// `GET /debug/pprof/profile?seconds=N` (CPU, pprof protobuf, 1..=60 s, one at a time) and
    /// `/debug/pprof/heap` (501: mimalloc records no allocation stacks), behind
    /// `MALL_ADMIN_TOKEN`. Unset: no admin port. Profiles are never served on `MALL_LISTEN`: the
    /// sidecar forwards every path of that port to the world.
    #[arg(long, env = "MALL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The bearer token the admin port requires (`Authorization: Bearer <token>`); required with
    /// `MALL_ADMIN_LISTEN`. Never logged.
    #[arg(long, env = "MALL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Redacted>,
    #[arg(long, env = "MALL_ENV", value_enum, default_value = "development")]
    pub env: Environment,
    #[arg(long, env = "MALL_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis for the L2 cache and cross-instance invalidation. Unset: L1 only.
    #[arg(long, env = "MALL_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel, so several malls can share one Redis.
    #[arg(long, env = "MALL_REDIS_PREFIX", default_value = "mall")]
    pub redis_prefix: String,
    /// Redis operations slower than this count as misses (the database answers instead).
    #[arg(long, env = "MALL_REDIS_TIMEOUT_MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,
    /// How often SQLite and MySQL are asked for new invalidation records (PostgreSQL is
    /// listened to, and asked once a second besides): the longest another instance's write
    /// stays unseen here.
    #[arg(long, env = "MALL_INVALIDATION_POLL_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    pub invalidation_poll_ms: u64,
    /// Invalidation records older than this are deleted. An instance cut off from the database
    /// for longer clears its L1 when it reconnects.
    #[arg(long, env = "MALL_INVALIDATION_RETAIN_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..))]
    pub invalidation_retain_secs: u64,
    /// This pod's sidecar (`http://127.0.0.1:8080`), purged of the objects in each invalidation
    /// record, so a write through any pod empties every pod's shared cache without Redis.
    #[arg(long, env = "MALL_SIDECAR_PURGE_URL")]
    pub sidecar_purge_url: Option<String>,
    /// L1 cache budget in bytes. Default: a quarter of the memory limit.
    #[arg(long, env = "MALL_CACHE_BYTES")]
    pub cache_bytes: Option<u64>,
    /// Product TTL (seed 000: goods 10 min).
    #[arg(long, env = "MALL_CACHE_TTL_PRODUCT_SECS", default_value_t = 600)]
    pub cache_ttl_product_secs: u64,
    /// Order TTL (seed 000: 5 min).
    #[arg(long, env = "MALL_CACHE_TTL_ORDER_SECS", default_value_t = 300)]
    pub cache_ttl_order_secs: u64,
    /// User TTL (seed 000: 30 min).
    #[arg(long, env = "MALL_CACHE_TTL_USER_SECS", default_value_t = 1800)]
    pub cache_ttl_user_secs: u64,
    /// Hottest products loaded into the cache before /ready says yes.
    #[arg(long, env = "MALL_WARMUP_PRODUCTS", default_value_t = 200)]
    pub warmup_products: u32,
    /// Products loaded into the cache before /ready says yes, besides the hottest ones: the hot
    /// products of a sale window (comma-separated ids; the operator sets it during a window).
    #[arg(long, env = "MALL_WARMUP_PRODUCT_IDS", value_delimiter = ',')]
    pub warmup_product_ids: Vec<i64>,
    /// Tokio worker threads. Default: the CPU limit, rounded down, at least 1.
    #[arg(long, env = "MALL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Snowflake worker id (0..=1023); should differ between instances sharing a database. `auto`
    /// derives it from the host name (a pod's name), as the operator sets it; a rare clash only
    /// costs the clashing order a retry.
    #[arg(long, env = "MALL_WORKER_ID", default_value = "0", value_parser = parse_worker_id)]
    pub worker_id: u16,
    /// HS256 secret for tokens (at least 32 bytes). Required in production.
    #[arg(long, env = "MALL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Token lifetime.
    #[arg(long, env = "MALL_JWT_TTL_SECS", default_value_t = 86_400)]
    pub jwt_ttl_secs: u64,
    /// Largest accepted request body.
    #[arg(long, env = "MALL_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest quantity of one product in a cart line or an order.
    #[arg(long, env = "MALL_MAX_QUANTITY", default_value_t = 10_000)]
    pub max_quantity: i64,
    /// Most distinct products in one order.
    #[arg(long, env = "MALL_MAX_ORDER_ITEMS", default_value_t = 100)]
    pub max_order_items: usize,
    /// Requests slower than this are logged at WARN (seed 000: 1 s).
    #[arg(long, env = "MALL_SLOW_REQUEST_MS", default_value_t = 1000)]
    pub slow_request_ms: u64,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[arg(long, env = "MALL_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20)]
    pub shutdown_timeout_secs: u64,
    /// On SIGTERM, `/ready` fails at once but requests are still served for this long before the
    /// drain starts: long enough for the sidecar's health check (1 s by default) and Kubernetes'
    /// endpoint updates to stop sending new requests, so none arrives at a closing listener.
    #[arg(long, env = "MALL_SHUTDOWN_DELAY_MS", default_value_t = 5000)]
    pub shutdown_delay_ms: u64,
    /// How long an `Idempotency-Key` is remembered (draft-ietf-httpapi-idempotency-key-header):
    /// a repeat within it replays the first order; expired keys are deleted in the background and
    /// the key may then be used again. Published in the `Idempotency-Key-Lifetime` response header.
    #[arg(long, env = "MALL_IDEMPOTENCY_KEY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_key_ttl_secs: u64,
    /// Group commit (seed 000's batch size): the most concurrent orders placed in one transaction
    /// of set-based statements. 1 turns batching off (one transaction per order).
    #[arg(long, env = "MALL_ORDER_BATCH_MAX", default_value_t = 64)]
    pub order_batch_max: usize,
    /// Group commit (seed 000's flush timeout): after the first order of a batch arrives, wait up
    /// to this many microseconds for more. 0 takes what is already queued, which under load is
    /// what arrived while the previous batch committed, and never delays a lone order.
    #[arg(long, env = "MALL_ORDER_BATCH_FLUSH_US", default_value_t = 0)]
    pub order_batch_flush_us: u64,
    /// Order transactions (batches, or lone orders) in flight at once. One lets every order that
    /// arrives while a batch commits join the next batch; more overlap batches, which then wait on
    /// each other's product rows (measured no faster on PostgreSQL, slower on SQLite).
    #[arg(long, env = "MALL_ORDER_BATCH_WRITERS", default_value_t = 1)]
    pub order_batch_writers: usize,
    /// Group commit on PostgreSQL, MySQL and MariaDB: statements that take the batch as one array
    /// parameter each (PostgreSQL arrays with `unnest`, a JSON array through `JSON_TABLE`), so
    /// their text (and so their prepared plan) does not depend on the batch size. Off by default:
    /// no faster than the multi-row statements in BENCHMARKS.md section 2c.
    #[arg(long, env = "MALL_ORDER_BATCH_ARRAYS", default_value_t = false, action = clap::ArgAction::Set)]
    pub order_batch_arrays: bool,
    /// Seed products and users at start (idempotent).
    #[arg(long, env = "MALL_SEED")]
    pub seed: bool,
    /// The `admin` account's password (the operator takes it from a Secret): at start the
    /// account is created with it, or its password set to it, so rotating the Secret takes
    /// effect at the next rollout. At least 12 characters. Never logged.
    #[arg(long, env = "MALL_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<Redacted>,
    #[command(flatten)]
    pub seed_args: SeedArgs,
}

/// Parses just the `serve` flags (and their `MALL_*` variables), without a program name.
fn parse_serve_args<I, T>(args: I) -> Result<ServeArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }
    let argv = std::iter::once("mall-app".into()).chain(args.into_iter().map(Into::into));
    Ok(Serve::try_parse_from::<_, std::ffi::OsString>(argv)?.args)
}

const DEV_JWT_SECRET: &str = "development-only-secret-do-not-use-in-production";

/// A secret setting: `{:?}` shows `<redacted>`, so printing the configuration never shows it.
#[derive(Clone)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Redacted(s.to_string()))
    }
}

/// Resolved settings: explicit values, else derived from the container's limits.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: ServeArgs,
    pub resources: Resources,
    pub tuning: Tuning,
    pub jwt_secret: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

/// `auto` (hash of `HOSTNAME` or /etc/hostname, mod 1024) or a number.
fn parse_worker_id(value: &str) -> Result<u16, String> {
    if value != "auto" {
        return value
            .parse::<u16>()
            .map_err(|_| format!("`{value}` is not `auto` or 0..=1023"));
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    // FNV-1a: stable across releases, unlike std's hasher.
    let hash = host
        .trim()
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    Ok((hash % (crate::ids::MAX_WORKER_ID as u64 + 1)) as u16)
}

impl Config {
    /// Parses flags (and `MALL_*` variables) the way the `serve` command does; for tests and tools.
    pub fn from_args<I, T>(args: I) -> Result<Config, anyhow::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Config::resolve(parse_serve_args(args)?, tuning::detect())?)
    }

    pub fn resolve(args: ServeArgs, resources: Resources) -> Result<Config, ConfigError> {
        let mut tuning = tuning::derive(&resources);
        let db = &args.db;
        if let Some(n) = args.worker_threads {
            if n == 0 {
                return Err(invalid("MALL_WORKER_THREADS", "must be at least 1"));
            }
            tuning.worker_threads = n;
        }
        tuning.primary_pool.max = db.db_max_connections.unwrap_or(tuning.primary_pool.max);
        tuning.primary_pool.min = db.db_min_connections.unwrap_or(tuning.primary_pool.min);
        tuning.replica_pool.max = db.db_replica_max_connections.unwrap_or(tuning.replica_pool.max);
        tuning.replica_pool.min = db.db_replica_min_connections.unwrap_or(tuning.replica_pool.min);
        tuning.cache_bytes = args.cache_bytes.unwrap_or(tuning.cache_bytes);
        for (field, pool) in [
            ("MALL_DB_MAX_CONNECTIONS", tuning.primary_pool),
            ("MALL_DB_REPLICA_MAX_CONNECTIONS", tuning.replica_pool),
        ] {
            if pool.max == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        // An explicit max below the derived min lowers the min rather than failing.
        tuning.primary_pool.min = tuning.primary_pool.min.min(tuning.primary_pool.max);
        tuning.replica_pool.min = tuning.replica_pool.min.min(tuning.replica_pool.max);
        if args.worker_id > crate::ids::MAX_WORKER_ID {
            return Err(invalid(
                "MALL_WORKER_ID",
                format!("must be 0..={}", crate::ids::MAX_WORKER_ID),
            ));
        }
        if args.db.db_acquire_timeout_ms == 0 {
            return Err(invalid("MALL_DB_ACQUIRE_TIMEOUT_MS", "must be greater than 0"));
        }
        if args.max_quantity <= 0 {
            return Err(invalid("MALL_MAX_QUANTITY", "must be greater than 0"));
        }
        if !(1..=1024).contains(&args.order_batch_max) {
            return Err(invalid(
                "MALL_ORDER_BATCH_MAX",
                "must be 1..=1024 (1 turns batching off)",
            ));
        }
        if args.order_batch_flush_us > 100_000 {
            return Err(invalid("MALL_ORDER_BATCH_FLUSH_US", "must be at most 100000 (100 ms)"));
        }
        if !(1..=64).contains(&args.order_batch_writers) {
            return Err(invalid("MALL_ORDER_BATCH_WRITERS", "must be 1..=64"));
        }
        if args.max_order_items == 0 {
            return Err(invalid("MALL_MAX_ORDER_ITEMS", "must be greater than 0"));
        }
        if args.redis_prefix.is_empty() || args.redis_prefix.contains(char::is_whitespace) {
            return Err(invalid("MALL_REDIS_PREFIX", "must be non-empty without spaces"));
        }
        let jwt_secret = match (&args.jwt_secret, args.env) {
            (Some(s), _) if s.len() >= 32 => s.clone(),
            (Some(_), _) => return Err(invalid("MALL_JWT_SECRET", "must be at least 32 bytes")),
            (None, Environment::Production) => {
                return Err(invalid("MALL_JWT_SECRET", "is required when MALL_ENV=production"))
            }
            (None, Environment::Development) => DEV_JWT_SECRET.to_string(),
        };
        if args.admin_password.as_ref().is_some_and(|p| p.0.chars().count() < 12) {
            return Err(invalid("MALL_ADMIN_PASSWORD", "must be at least 12 characters"));
        }
        if let Some(admin) = args.admin_listen {
            if args.admin_token.as_ref().is_none_or(|t| t.0.is_empty()) {
                return Err(invalid(
                    "MALL_ADMIN_TOKEN",
                    "is required with MALL_ADMIN_LISTEN: the admin port serves profiles only to its bearer",
                ));
            }
            if admin == args.listen {
                return Err(invalid("MALL_ADMIN_LISTEN", "must differ from MALL_LISTEN"));
            }
        }
        if args.env == Environment::Production && args.seed && args.seed_args.password == "mall-password" {
            return Err(invalid(
                "MALL_SEED_PASSWORD",
                "set a real password to seed users in production",
            ));
        }
        Ok(Config {
            args,
            resources,
            tuning,
            jwt_secret,
        })
    }

    pub fn uses_dev_secret(&self) -> bool {
        self.jwt_secret == DEV_JWT_SECRET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources() -> Resources {
        Resources {
            cpus: 2.0,
            memory_bytes: Some(1 << 30),
            memory_is_limit: true,
            cpus_from_cgroup: true,
        }
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::resolve(parse_serve_args(args.iter().copied()).unwrap(), resources())
    }

    #[test]
    fn worker_id_is_a_number_or_auto() {
        assert_eq!(parse_worker_id("12"), Ok(12));
        assert!(parse_worker_id("twelve").unwrap_err().contains("auto"));
        let auto = parse_worker_id("auto").unwrap();
        assert!(auto <= crate::ids::MAX_WORKER_ID);
        assert_eq!(parse_worker_id("auto").unwrap(), auto, "stable for one host");
    }

    #[test]
    fn production_requires_a_real_secret() {
        let err = parse(&["--env", "production"]).unwrap_err();
        assert_eq!(err.field, "MALL_JWT_SECRET");
        let err = parse(&["--env", "production", "--jwt-secret", "short"]).unwrap_err();
        assert_eq!(err.field, "MALL_JWT_SECRET");
        let ok = parse(&["--env", "production", "--jwt-secret", &"x".repeat(32)]).unwrap();
        assert!(!ok.uses_dev_secret());
        assert!(parse(&[]).unwrap().uses_dev_secret());
    }

    #[test]
    fn explicit_values_override_the_limits() {
        let c = parse(&[
            "--db-max-connections",
            "7",
            "--worker-threads",
            "3",
            "--cache-bytes",
            "1000",
        ])
        .unwrap();
        assert_eq!(c.tuning.primary_pool.max, 7);
        assert_eq!(
            c.tuning.primary_pool.min, 4,
            "derived min 4 fits under an explicit max of 7"
        );
        assert_eq!(c.tuning.worker_threads, 3);
        assert_eq!(c.tuning.cache_bytes, 1000);
        let c = parse(&["--db-max-connections", "1"]).unwrap();
        assert_eq!(c.tuning.primary_pool.min, 1, "min never exceeds max");
    }

    #[test]
    fn the_admin_port_needs_a_token() {
        let err = parse(&["--admin-listen", "127.0.0.1:9902"]).unwrap_err();
        assert_eq!(err.field, "MALL_ADMIN_TOKEN");
        assert!(err.to_string().contains("MALL_ADMIN_LISTEN"), "{err}");
        let err = parse(&["--admin-listen", "127.0.0.1:9902", "--admin-token", ""]).unwrap_err();
        assert_eq!(err.field, "MALL_ADMIN_TOKEN");
        let err = parse(&["--admin-listen", "127.0.0.1:8080", "--admin-token", "t"]).unwrap_err();
        assert_eq!(err.field, "MALL_ADMIN_LISTEN");
        let ok = parse(&["--admin-listen", "127.0.0.1:9902", "--admin-token", "s3cret"]).unwrap();
        assert!(
            !format!("{:?}", ok.args).contains("s3cret"),
            "the token is never printed"
        );
        assert!(
            parse(&[]).unwrap().args.admin_listen.is_none(),
            "no admin port by default"
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        assert_eq!(parse(&["--worker-id", "5000"]).unwrap_err().field, "MALL_WORKER_ID");
        assert_eq!(
            parse(&["--worker-threads", "0"]).unwrap_err().field,
            "MALL_WORKER_THREADS"
        );
        assert_eq!(
            parse(&["--db-max-connections", "0"]).unwrap_err().field,
            "MALL_DB_MAX_CONNECTIONS"
        );
    }
}
