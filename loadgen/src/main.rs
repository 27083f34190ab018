//! `mall-load`: seed 001's load scenarios against a running mall, with a report and an optional
//! database check. `mall-load --help` lists everything.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mall_loadgen::{check, run, Amount, Options, Scenario};

#[derive(Parser)]
#[command(
    name = "mall-load",
    version,
    about = "Load the mall as seed 001 did, and check it stayed correct"
)]
struct Cli {
    /// The mall's base URL (the sidecar, or one app instance).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    #[arg(long, value_enum, default_value = "mixed")]
    scenario: Scenario,
    /// Concurrent connections (default: seed 001's for the scenario: 50, 30, 20, 40; 50 for products).
    #[arg(short, long)]
    concurrency: Option<usize>,
    /// How long to run, in seconds (ignored with --requests).
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests instead of a duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Fixed request rate for the whole run (latency then timed from when each request was due).
    #[arg(long)]
    rate: Option<f64>,
    /// Users user1..userN to spread requests over.
    #[arg(long, default_value_t = 20)]
    users: usize,
    #[arg(
        long,
        env = "MALL_SEED_PASSWORD",
        default_value = "mall-password",
        hide_env_values = true
    )]
    password: String,
    /// Product ids are drawn from 1..=N (seed 001's wrk script: 1000).
    #[arg(long, default_value_t = 1000)]
    products: u64,
    /// Draw product ids Zipf-distributed instead of uniformly (a realistic hot set).
    #[arg(long)]
    zipf: bool,
    /// Units of the product the flash sale (`--scenario flash-sale`) creates and sells.
    #[arg(long, default_value_t = 1000)]
    flash_stock: u64,
    /// After the run, check the database (e.g. sqlite://data/mall.db, postgres://...): stock consumed
    /// = items ordered, one order per idempotency key. Nothing else may write to it meanwhile.
    #[arg(long)]
    check_database: Option<String>,
    /// Print the report as JSON (for BENCHMARKS.md tooling).
    #[arg(long)]
    json: bool,
    /// Fail (exit 1) when the success rate is below this percentage.
    #[arg(long)]
    min_success: Option<f64>,
    /// The flash sale with buyers who arrive once (`--scenario flash-sale`): this many, spread
    /// evenly over --arrival-seconds, each buying one unit until let through (honouring a
    /// waiting room's tickets and 429's Retry-After). Reports fairness instead of throughput.
    #[arg(long)]
    buyers: Option<usize>,
    #[arg(long, default_value_t = 3.0)]
    arrival_seconds: f64,
    /// Flash sale: accounts (users after the buyers') that each send `--attacker-requests`
    /// ticketless orders as fast as they can, ignoring the waiting room's answers.
    #[arg(long, default_value_t = 0)]
    attackers: usize,
    #[arg(long, default_value_t = 500)]
    attacker_requests: usize,
    /// Flash sale: clients without credentials sending orders in a loop until the sale ends.
    #[arg(long, default_value_t = 0)]
    anonymous: usize,
    /// Flash sale: run the attackers in the buyers' own runtime and connection pool, as this
    /// harness did before 2026-12-06 (for comparison; their answers then delay the buyers').
    #[arg(long)]
    attackers_share_runtime: bool,
    /// Flash sale: buyers sleep `Waiting-Room-Wait-Ms` from the 202's arrival, not until the
    /// turn the ticket names as a time (`Waiting-Room-Turn-At-Ms`), as this harness did before
    /// 2026-12-06 (for comparison: a slow 202 then moves the buyer's return).
    #[arg(long)]
    ignore_turn_at: bool,
    /// Flash sale: the --attackers accounts buy as honest buyers do (from the sale's start, one
    /// request, back at the turn the ticket names): the baseline for the attack's own cost.
    #[arg(long)]
    attackers_honest: bool,
    /// Flash sale: write each honest buyer's requests to this file, one JSON line per buyer
    /// (arrival, let-through, and every answer's status, position, turn and line), to see which
    /// buyers make the fairness figure.
    #[arg(long)]
    trace_buyers: Option<std::path::PathBuf>,
    /// Base URLs to spread the buyers over (one per pod's sidecar), comma-separated; default
    /// --target.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match go(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mall-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn go(cli: Cli) -> anyhow::Result<bool> {
    if let Some(buyers) = cli.buyers {
        return arrivals(&cli, buyers).await;
    }
    let options = Options {
        target: cli.target.trim_end_matches('/').to_string(),
        scenario: cli.scenario,
        concurrency: cli.concurrency,
        amount: match cli.requests {
            Some(n) => Amount::Requests(n),
            None => Amount::Duration(Duration::from_secs_f64(cli.duration)),
        },
        rate: cli.rate,
        users: cli.users,
        password: cli.password,
        products: cli.products,
        zipf: cli.zipf,
        progress: !cli.json,
        flash_stock: cli.flash_stock,
    };
    let db = match &cli.check_database {
        Some(url) => Some(check::connect(url).await?),
        None => None,
    };
    let before = match &db {
        Some(db) => Some(check::snapshot(db).await?),
        None => None,
    };
    let report = run(options).await?;
    let mut ok = cli.min_success.is_none_or(|min| report.success_rate * 100.0 >= min);
    let verdict = match (&db, &before) {
        (Some(db), Some(before)) => Some(check::verify(db, before, &report.ledger).await?),
        _ => None,
    };
    if let Some((problems, _)) = &verdict {
        ok &= problems.is_empty();
    }
    let mut value = serde_json::to_value(&report)?;
    value.as_object_mut().expect("object").remove("ledger");
    print_report(cli.json, value, &report, verdict)?;
    Ok(ok)
}

/// The report as JSON (with the check under `check`) or as text, then the check's lines.
fn print_report(
    json: bool,
    mut value: serde_json::Value,
    text: &impl std::fmt::Display,
    verdict: Option<(Vec<String>, Vec<String>)>,
) -> anyhow::Result<()> {
    if json {
        if let Some((problems, passed)) = verdict {
            value["check"] = serde_json::json!({ "problems": problems, "passed": passed });
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{text}");
        if let Some((problems, passed)) = verdict {
            for line in passed {
                println!("check ok      {line}");
            }
            for line in problems {
                println!("CHECK FAILED  {line}");
            }
        }
    }
    Ok(())
}

/// `--buyers`: the flash sale with arrivals, and the database check against what buyers were told.
async fn arrivals(cli: &Cli, buyers: usize) -> anyhow::Result<bool> {
    anyhow::ensure!(
        cli.scenario == Scenario::FlashSale,
        "--buyers: only with --scenario flash-sale"
    );
    let targets: Vec<String> = if cli.targets.is_empty() {
        vec![cli.target.trim_end_matches('/').to_string()]
    } else {
        cli.targets
            .iter()
            .map(|t| t.trim_end_matches('/').to_string())
            .collect()
    };
    let db = match &cli.check_database {
        Some(url) => Some(check::connect(url).await?),
        None => None,
    };
    let before = match &db {
        Some(db) => Some(check::snapshot(db).await?),
        None => None,
    };
    let report = mall_loadgen::arrivals::run(mall_loadgen::arrivals::Arrivals {
        targets,
        buyers,
        over: Duration::from_secs_f64(cli.arrival_seconds.max(0.0)),
        stock: cli.flash_stock,
        users: cli.users,
        password: cli.password.clone(),
        attackers: cli.attackers,
        attacker_requests: cli.attacker_requests,
        anonymous: cli.anonymous,
        attackers_share_runtime: cli.attackers_share_runtime,
        ignore_turn_at: cli.ignore_turn_at,
        attackers_honest: cli.attackers_honest,
        trace: cli.trace_buyers.clone(),
    })
    .await?;
    let verdict = match (&db, &before) {
        (Some(db), Some(before)) => Some(check::verify(db, before, &report.ledger).await?),
        _ => None,
    };
    let ok = verdict.as_ref().is_none_or(|(problems, _)| problems.is_empty());
    print_report(cli.json, serde_json::to_value(&report)?, &report, verdict)?;
    Ok(ok)
}
