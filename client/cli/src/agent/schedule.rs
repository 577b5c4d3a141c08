//! When a job is due: cron expressions (croner) evaluated in a named IANA
//! time zone (chrono-tz), and the pure rule that decides a run.
//!
//! A job is due when one of its fire times lies in (last handled, now]:
//! after any downtime it runs once, not once per missed fire time, and the
//! newest missed fire time becomes the last handled one. A job with no
//! state yet (a new job, a new agent) runs at its first pass, for its
//! newest fire time, as if that one had been missed: a new weekly backup
//! runs at the first start rather than up to a week later, and an hourly
//! job started at 10:30 runs for 10:00, once. (The brief's "due when a fire
//! time lies within one period before now" is the same rule: the newest
//! fire time always does.) Daylight-saving gaps and repeats are the crate's:
//! a fire time that does not exist that day is skipped, one that happens
//! twice fires once.

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
}

impl Schedule {
    /// `expression`: five fields (minute hour day-of-month month day-of-week),
    /// six with seconds first, or an alias such as `@daily`; `zone`: an IANA
    /// name ("Europe/Berlin", "UTC").
    pub fn new(expression: &str, zone: &str) -> anyhow::Result<Schedule> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression.trim())
            .map_err(|e| {
                anyhow!("schedule {expression:?}: {e} (five fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\"; or six with seconds first)")
            })?;
        let zone: Tz = zone.trim().parse().map_err(|_| {
            anyhow!(
                "time_zone {zone:?}: not an IANA time zone name (e.g. \"Europe/Berlin\", \"UTC\")"
            )
        })?;
        let schedule = Schedule { cron, zone };
        // An expression that never fires (31 February) is a typo.
        if schedule.next_after(Utc::now()).is_none() {
            return Err(anyhow!("schedule {expression:?}: never fires"));
        }
        Ok(schedule)
    }

    /// The newest fire time at or before `now`.
    pub fn latest_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&now.with_timezone(&self.zone), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The first fire time after `time`.
    pub fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&time.with_timezone(&self.zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The nominal period: the gap between the next two fire times after
    /// `now` (what `cairn_agent_job_interval_seconds` exports, so "late" is
    /// `time() - last_success > 2 * interval`).
    pub fn interval_after(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        let first = self.next_after(now)?;
        let second = self.next_after(first)?;
        Some(second - first)
    }

    /// The fire time to run for at `now`, if the job is due; `last_handled`
    /// is the fire time its last run (or skip) was for, `None` before the
    /// first. See the module doc for the rule.
    pub fn due(
        &self,
        last_handled: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let latest = self.latest_at_or_before(now)?;
        match last_handled {
            Some(handled) => (latest > handled).then_some(latest),
            None => Some(latest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_missed_run_is_caught_up_once_for_the_newest_fire_time() {
        let hourly = Schedule::new("0 * * * *", "UTC").expect("hourly");
        let handled = at("2026-03-02T00:00:00Z");
        // Five days later: due once, for the newest fire time.
        let now = at("2026-03-07T00:30:00Z");
        assert_eq!(
            hourly.due(Some(handled), now),
            Some(at("2026-03-07T00:00:00Z"))
        );
        // Once handled, not again until the next hour.
        let handled = at("2026-03-07T00:00:00Z");
        assert_eq!(hourly.due(Some(handled), now), None);
        assert_eq!(
            hourly.due(Some(handled), at("2026-03-07T01:00:00Z")),
            Some(at("2026-03-07T01:00:00Z"))
        );
    }

    #[test]
    fn a_new_job_runs_at_its_first_pass_for_its_newest_fire_time() {
        let weekly = Schedule::new("0 0 * * MON", "UTC").expect("weekly");
        // Monday 2026-03-02 00:00 itself, and Wednesday of that week.
        assert_eq!(
            weekly.due(None, at("2026-03-02T00:00:00Z")),
            Some(at("2026-03-02T00:00:00Z"))
        );
        assert_eq!(
            weekly.due(None, at("2026-03-04T10:00:00Z")),
            Some(at("2026-03-02T00:00:00Z"))
        );
        let monthly = Schedule::new("0 0 1 * *", "UTC").expect("monthly");
        assert_eq!(
            monthly.due(None, at("2026-03-01T00:00:00Z")),
            Some(at("2026-03-01T00:00:00Z"))
        );
        // A day-of-month job whose period is a month is due within it.
        assert!(monthly.due(None, at("2026-03-20T00:00:00Z")).is_some());
        let yearly = Schedule::new("0 0 1 1 *", "UTC").expect("yearly");
        assert!(yearly.due(None, at("2026-03-20T00:00:00Z")).is_some());
        // An hourly job started at 10:30 runs for 10:00.
        let hourly = Schedule::new("0 * * * *", "UTC").expect("hourly");
        assert_eq!(
            hourly.due(None, at("2026-03-04T10:30:00Z")),
            Some(at("2026-03-04T10:00:00Z"))
        );
    }

    #[test]
    fn fire_times_follow_the_named_time_zone() {
        let berlin = Schedule::new("0 2 * * *", "Europe/Berlin").expect("berlin");
        // 02:00 in Berlin in winter (UTC+1) is 01:00 UTC.
        assert_eq!(
            berlin.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T01:00:00Z"))
        );
        // In summer (UTC+2) it is 00:00 UTC.
        assert_eq!(
            berlin.next_after(at("2026-07-10T23:30:00Z")),
            Some(at("2026-07-11T00:00:00Z"))
        );
        let daily = Schedule::new("@daily", "UTC").expect("alias");
        assert_eq!(
            daily.interval_after(at("2026-07-10T23:30:00Z")),
            Some(chrono::Duration::days(1))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(Schedule::new("61 * * * *", "UTC").is_err());
        assert!(Schedule::new("0 0 31 2 *", "UTC").is_err());
        let zone = Schedule::new("0 * * * *", "Europe/Atlantis").expect_err("zone");
        assert!(zone.to_string().contains("IANA"), "{zone}");
    }
}
