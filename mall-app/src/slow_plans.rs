//! The plan of a slow statement, on PostgreSQL: logged once per statement text (and again only
//! when the plan changed), never per occurrence. A slow statement (`telemetry::Statements`)
//! hands its text here; one task asks the primary for its generic plan.
//!
//! sqlx's statement events carry the text, not the parameters, so the plan is the one
//! PostgreSQL uses for any parameters: the statement is prepared and explained with
//! `plan_cache_mode = force_generic_plan` and NULL for each `$n`, inside a transaction that is
//! rolled back (EXPLAIN without ANALYZE runs nothing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::{Executor, Row};
use tokio::sync::mpsc;

use crate::db::{Db, Dialect};

/// A statement's plan is asked for again at most this often.
const RECHECK: Duration = Duration::from_secs(600);
/// Statements remembered; beyond this the oldest are forgotten.
const REMEMBERED: usize = 256;

struct Explainer {
    tx: mpsc::Sender<(String, String)>,
    /// Statement text -> when it was last explained.
    asked: Mutex<HashMap<String, Instant>>,
}

static EXPLAINER: OnceLock<Explainer> = OnceLock::new();

/// Starts the explainer for `db` (PostgreSQL only; the first app of a process wins).
pub fn start(db: Arc<Db>) {
    if db.dialect != Dialect::Postgres || EXPLAINER.get().is_some() {
        return;
    }
    let (tx, rx) = mpsc::channel(16);
    if EXPLAINER
        .set(Explainer {
            tx,
            asked: Mutex::default(),
        })
        .is_ok()
    {
        tokio::spawn(run(db, rx));
    }
}

/// Asks for the plan of a slow statement unless it was asked for lately. Never waits.
pub fn explain_later(name: String, sql: &str) {
    let Some(e) = EXPLAINER.get() else { return };
    let verb = name.split(' ').next().unwrap_or("");
    if !matches!(verb, "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "WITH") {
        return;
    }
    {
        let mut asked = e.asked.lock().expect("asked");
        if asked.get(sql).is_some_and(|at| at.elapsed() < RECHECK) {
            return;
        }
        if asked.len() >= REMEMBERED {
            if let Some(oldest) = asked.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                asked.remove(&oldest);
            }
        }
        asked.insert(sql.to_string(), Instant::now());
    }
    let _ = e.tx.try_send((name, sql.to_string()));
}

async fn run(db: Arc<Db>, mut rx: mpsc::Receiver<(String, String)>) {
    // Statement text -> the plan last logged for it.
    let mut logged: HashMap<String, String> = HashMap::new();
    while let Some((name, sql)) = rx.recv().await {
        match plan(&db, &sql).await {
            Ok(plan) => {
                if logged.get(&sql) != Some(&plan) {
                    tracing::warn!(target: "mall_app::slow_statement", statement = %name, sql = %sql, plan = %plan, "slow statement plan");
                    if logged.len() >= REMEMBERED {
                        logged.clear();
                    }
                    logged.insert(sql, plan);
                }
            }
            Err(e) => tracing::info!(statement = %name, error = %e, "no plan for a slow statement"),
        }
    }
}

/// The highest `$n` in `sql`.
fn parameters(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let digits: String = sql[i + 1..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<usize>() {
                max = max.max(n);
            }
            i += 1 + digits.len();
        } else {
            i += 1;
        }
    }
    max
}

async fn plan(db: &Db, sql: &str) -> Result<String, sqlx::Error> {
    let lease = db.write().await?;
    let mut tx = lease.begin().await?;
    tx.execute("SET LOCAL plan_cache_mode = force_generic_plan").await?;
    tx.execute(sqlx::raw_sql(&format!("PREPARE mall_slow_plan AS {sql}")))
        .await?;
    let args = vec!["NULL"; parameters(sql)].join(", ");
    let explain = if args.is_empty() {
        "EXPLAIN EXECUTE mall_slow_plan".to_string()
    } else {
        format!("EXPLAIN EXECUTE mall_slow_plan({args})")
    };
    let rows = tx.fetch_all(sqlx::raw_sql(&explain)).await?;
    let lines: Vec<String> = rows.iter().filter_map(|r| r.try_get::<String, _>(0).ok()).collect();
    tx.rollback().await?;
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_the_positional_parameters() {
        assert_eq!(
            super::parameters("SELECT * FROM products WHERE id = $1 AND stock > $12"),
            12
        );
        assert_eq!(super::parameters("SELECT 1"), 0);
        assert_eq!(super::parameters("SELECT '$' || $2"), 2);
    }
}
