//! Sale windows: when each one is in effect, and what it changes. Pure functions of the spec and
//! a time, so `operator render --at TIME` shows exactly what the controller applies at TIME.
//!
//! A window is in effect from `leadMinutes` before its start until its end. While any is, the
//! replica floor is the highest of their `minReplicas` (capped at `maxReplicas`), the pods warm
//! the union of their hot products before they report ready, and the tightest order limit
//! applies to the sidecar's `POST /api/orders` rules. These are part of the pod template, so a
//! window taking effect rolls the pods once (surge first, none unavailable): every pod serving the
//! sale started warm and with the sale's limits. Times are wall-clock times in the window's IANA
//! time zone, so a daily 09:00 sale stays at 09:00 across daylight-saving changes.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::ToSpan;

use crate::crd::{MallDeploymentSpec, OrderLimit, Recurrence, SaleWindow, WaitingRoomSpec};

/// One occurrence of a window, in Unix seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence<'a> {
    pub window: &'a SaleWindow,
    /// From when it is in effect: `start` minus the lead time.
    pub applies: i64,
    pub start: i64,
    pub end: i64,
}

struct Parsed {
    start: DateTime,
    end: DateTime,
    tz: TimeZone,
}

fn parse_time(field: &str, value: &str) -> Result<DateTime, String> {
    value
        .parse::<DateTime>()
        .map_err(|e| format!("{field}: {value:?} is not a date and time like 2026-11-27T09:00 ({e})"))
}

fn parse(i: usize, w: &SaleWindow) -> Result<Parsed, String> {
    let at = |f: &str| format!("spec.saleWindows[{i}].{f}");
    let start = parse_time(&at("start"), &w.start)?;
    let end = parse_time(&at("end"), &w.end)?;
    let tz = TimeZone::get(&w.time_zone).map_err(|_| {
        format!(
            "{}: {:?} is not an IANA time zone such as Europe/Berlin",
            at("timeZone"),
            w.time_zone
        )
    })?;
    if end <= start {
        return Err(format!("{}: must be after start ({})", at("end"), w.start));
    }
    if let Some(days) = period_days(w.recurrence) {
        let longest = start
            .checked_add(days.days())
            .map_err(|e| format!("{}: {e}", at("start")))?;
        if end > longest {
            return Err(format!(
                "{}: a {} window must end within {days} day(s) of its start",
                at("end"),
                if days == 1 { "daily" } else { "weekly" }
            ));
        }
    }
    Ok(Parsed { start, end, tz })
}

/// Checks every window (times, time zone, order, length); the error names the field.
pub fn check(spec: &MallDeploymentSpec) -> Result<(), String> {
    for (i, w) in spec.sale_windows.iter().enumerate() {
        parse(i, w)?;
    }
    Ok(())
}

fn period_days(r: Recurrence) -> Option<i64> {
    match r {
        Recurrence::None => None,
        Recurrence::Daily => Some(1),
        Recurrence::Weekly => Some(7),
    }
}

fn seconds(dt: DateTime, tz: &TimeZone) -> Option<i64> {
    // A wall-clock time skipped by a daylight-saving change resolves to the instant after the gap,
    // an ambiguous one to its first occurrence (jiff's "compatible" rule, as RFC 5545 does).
    tz.to_zoned(dt).ok().map(|z| z.timestamp().as_second())
}

/// The `k`-th occurrence of a window (0 is the first).
fn occurrence<'a>(w: &'a SaleWindow, p: &Parsed, k: i64) -> Option<Occurrence<'a>> {
    let shift = period_days(w.recurrence).map_or(0, |d| d * k);
    let start = seconds(p.start.checked_add(shift.days()).ok()?, &p.tz)?;
    let end = seconds(p.end.checked_add(shift.days()).ok()?, &p.tz)?;
    Some(Occurrence {
        window: w,
        applies: start - w.lead_minutes as i64 * 60,
        start,
        end,
    })
}

/// The occurrences of `w` that can be in effect at, or next after, `now`.
fn around<'a>(w: &'a SaleWindow, now: i64) -> Vec<Occurrence<'a>> {
    let Ok(p) = parse(0, w) else { return Vec::new() };
    let Some(days) = period_days(w.recurrence) else {
        return occurrence(w, &p, 0).into_iter().collect();
    };
    let Some(first) = occurrence(w, &p, 0) else {
        return Vec::new();
    };
    // Daylight saving moves an occurrence by an hour at most: the neighbours cover it.
    let k = (now - first.applies).div_euclid(days * 86_400);
    (k - 1..=k + 2)
        .filter(|k| *k >= 0)
        .filter_map(|k| occurrence(w, &p, k))
        .collect()
}

/// The windows in effect at a time, and the next to take effect: every window parsed once.
#[derive(Debug, Clone, Default)]
pub struct Schedule<'a> {
    pub active: Vec<Occurrence<'a>>,
    pub next: Option<Occurrence<'a>>,
}

impl<'a> Schedule<'a> {
    pub fn at(spec: &'a MallDeploymentSpec, now: i64) -> Schedule<'a> {
        let mut schedule = Schedule::default();
        for o in spec.sale_windows.iter().flat_map(|w| around(w, now)) {
            if o.applies <= now && now < o.end {
                schedule.active.push(o);
            } else if o.applies > now && schedule.next.as_ref().is_none_or(|n| o.applies < n.applies) {
                schedule.next = Some(o);
            }
        }
        schedule
    }

    /// When what is in effect changes next: an active window ends or the next one applies.
    pub fn next_change(&self) -> Option<i64> {
        let ends = self.active.iter().map(|o| o.end);
        ends.chain(self.next.as_ref().map(|o| o.applies)).min()
    }

    /// What the windows in effect change; floors are capped at `max_replicas`.
    pub fn plan(&self, max_replicas: i32) -> SalePlan {
        let mut plan = SalePlan::default();
        for o in &self.active {
            let w = o.window;
            if plan.windows.contains(&w.name) {
                continue;
            }
            plan.windows.push(w.name.clone());
            plan.floor = plan.floor.max(Some(w.min_replicas.min(max_replicas)));
            for id in &w.hot_products.ids {
                if !plan.warm_ids.contains(id) {
                    plan.warm_ids.push(*id);
                }
            }
            plan.warm_top = plan.warm_top.max(w.hot_products.top);
            if let Some(room) = &w.waiting_room {
                // Two windows with a room: the smaller budget.
                let tighter = plan
                    .waiting_room
                    .as_ref()
                    .is_none_or(|r| room.admit_per_second < r.admit_per_second);
                if tighter {
                    plan.waiting_room = Some(room.clone());
                }
            }
            if let Some(limit) = &w.order_limit {
                let tighter = plan
                    .order_limit
                    .as_ref()
                    .is_none_or(|l| limit.requests_per_second < l.requests_per_second);
                if tighter {
                    plan.order_limit = Some(limit.clone());
                }
            }
        }
        plan
    }
}

/// What the windows in effect change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SalePlan {
    /// Names of the windows in effect.
    pub windows: Vec<String>,
    /// The replica floor they ask for, capped at maxReplicas.
    pub floor: Option<i32>,
    /// Products to warm: the windows' ids, in order, without repeats.
    pub warm_ids: Vec<i64>,
    /// The most-ordered products to warm.
    pub warm_top: Option<u32>,
    /// The tightest order limit.
    pub order_limit: Option<OrderLimit>,
    /// The waiting room with the smallest budget.
    pub waiting_room: Option<WaitingRoomSpec>,
}

/// What the sale windows in effect at `now` change.
pub fn plan(spec: &MallDeploymentSpec, now: i64) -> SalePlan {
    Schedule::at(spec, now).plan(spec.max_replicas)
}

/// Parses `--at` for `operator render`: RFC 3339 (`2026-11-27T09:00:00Z`, or with an offset).
pub fn parse_instant(value: &str) -> Result<i64, String> {
    value
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| format!("--at: {value:?} is not an RFC 3339 time such as 2026-11-27T09:00:00Z ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::HotProducts;

    fn window(name: &str, start: &str, end: &str, tz: &str, recurrence: Recurrence) -> SaleWindow {
        SaleWindow {
            name: name.into(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
            recurrence,
            lead_minutes: 15,
            min_replicas: 6,
            hot_products: HotProducts::default(),
            order_limit: None,
            waiting_room: None,
        }
    }

    fn spec(windows: Vec<SaleWindow>) -> MallDeploymentSpec {
        MallDeploymentSpec {
            sale_windows: windows,
            max_replicas: 10,
            ..MallDeploymentSpec::default()
        }
    }

    fn at(s: &str) -> i64 {
        parse_instant(s).unwrap()
    }

    fn active_at(spec: &MallDeploymentSpec, now: i64) -> Vec<Occurrence<'_>> {
        Schedule::at(spec, now).active
    }

    fn next_at(spec: &MallDeploymentSpec, now: i64) -> Option<Occurrence<'_>> {
        Schedule::at(spec, now).next
    }

    fn next_change(spec: &MallDeploymentSpec, now: i64) -> Option<i64> {
        Schedule::at(spec, now).next_change()
    }

    #[test]
    fn a_one_off_window_applies_from_its_lead_time_to_its_end() {
        let s = spec(vec![window(
            "black-friday",
            "2026-11-27T09:00",
            "2026-11-28T00:00",
            "Europe/Berlin",
            Recurrence::None,
        )]);
        // Berlin is UTC+1 in November: 09:00 there is 08:00Z, the lead time 07:45Z.
        for (now, active) in [
            ("2026-11-27T07:44:59Z", false),
            ("2026-11-27T07:45:00Z", true),
            ("2026-11-27T22:59:59Z", true),
            ("2026-11-27T23:00:00Z", false),
        ] {
            assert_eq!(!active_at(&s, at(now)).is_empty(), active, "{now}");
        }
        let next = next_at(&s, at("2026-11-27T07:00:00Z")).unwrap();
        assert_eq!(
            (next.applies, next.start),
            (at("2026-11-27T07:45:00Z"), at("2026-11-27T08:00:00Z"))
        );
        assert_eq!(
            next_change(&s, at("2026-11-27T12:00:00Z")),
            Some(at("2026-11-27T23:00:00Z"))
        );
        assert!(
            next_at(&s, at("2026-11-28T00:00:00Z")).is_none(),
            "a one-off window is over"
        );
    }

    #[test]
    fn a_daily_window_keeps_its_wall_clock_time_across_daylight_saving() {
        let s = spec(vec![window(
            "lunch",
            "2026-03-27T12:00",
            "2026-03-27T14:00",
            "Europe/Berlin",
            Recurrence::Daily,
        )]);
        // Before the change (29 March 2026) noon is 11:00Z, after it 10:00Z.
        assert!(!active_at(&s, at("2026-03-28T11:30:00Z")).is_empty());
        assert!(active_at(&s, at("2026-03-30T12:30:00Z")).is_empty());
        assert!(!active_at(&s, at("2026-03-30T10:30:00Z")).is_empty());
        let next = next_at(&s, at("2026-03-29T15:00:00Z")).unwrap();
        assert_eq!(next.start, at("2026-03-30T10:00:00Z"));
        assert!(
            active_at(&s, at("2026-03-26T11:30:00Z")).is_empty(),
            "nothing before the first"
        );
    }

    #[test]
    fn windows_in_effect_together_take_the_highest_floor_and_tightest_limit() {
        let mut a = window("a", "2026-11-27T09:00", "2026-11-27T18:00", "UTC", Recurrence::None);
        a.hot_products = HotProducts {
            ids: vec![1, 2],
            top: Some(50),
        };
        a.order_limit = Some(OrderLimit {
            requests_per_second: 5.0,
            burst: 10,
        });
        let mut b = window("b", "2026-11-27T12:00", "2026-11-27T13:00", "UTC", Recurrence::None);
        b.min_replicas = 40;
        b.hot_products.ids = vec![2, 3];
        b.order_limit = Some(OrderLimit {
            requests_per_second: 2.0,
            burst: 4,
        });
        let s = spec(vec![a, b]);
        let p = plan(&s, at("2026-11-27T12:30:00Z"));
        assert_eq!(p.windows, ["a", "b"]);
        assert_eq!(p.floor, Some(10), "capped at maxReplicas");
        assert_eq!(p.warm_ids, [1, 2, 3]);
        assert_eq!(p.warm_top, Some(50));
        assert_eq!(p.order_limit.unwrap().requests_per_second, 2.0);
        assert_eq!(plan(&s, at("2026-11-27T20:00:00Z")), SalePlan::default());
    }

    #[test]
    fn bad_windows_name_the_field() {
        for (w, field) in [
            (
                window("x", "27.11.2026 09:00", "2026-11-27T10:00", "UTC", Recurrence::None),
                "spec.saleWindows[0].start",
            ),
            (
                window("x", "2026-11-27T09:00", "2026-11-27T08:00", "UTC", Recurrence::None),
                "spec.saleWindows[0].end",
            ),
            (
                window(
                    "x",
                    "2026-11-27T09:00",
                    "2026-11-27T10:00",
                    "Mars/Olympus",
                    Recurrence::None,
                ),
                "spec.saleWindows[0].timeZone",
            ),
            (
                window("x", "2026-11-27T09:00", "2026-11-29T10:00", "UTC", Recurrence::Daily),
                "spec.saleWindows[0].end",
            ),
        ] {
            let e = check(&spec(vec![w])).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }
}
