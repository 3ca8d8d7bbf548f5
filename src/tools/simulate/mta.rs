//! Retry schedules of sending MTAs: when a message deferred at RCPT is tried again, and
//! when its sender gives up. Pure: times are seconds since the message arrived in the
//! sender's queue (its first attempt is at 0).
//!
//! The defaults follow each MTA's documentation and source:
//! - **Postfix** (`qmgr/qmgr_active.c`, `qmgr_active_done_3_generic`): after a deferral the
//!   queue file is moved `clamp(age, minimal_backoff_time, maximal_backoff_time)` into the
//!   future (300 s and 4000 s by default), so the backoff doubles from 300 s until it
//!   reaches 4000 s; the deferred queue is scanned every `queue_run_delay` (300 s), so a
//!   retry happens at the first scan after that time. A message older than
//!   `maximal_queue_lifetime` (5 days) is returned after its next failed attempt.
//! - **Exim** (spec chapter "Retry configuration", `src/retry.c`): the default rule
//!   `* * F,2h,15m; G,16h,1h,1.5; F,4d,6h` — every 15 minutes for 2 hours, then gaps from
//!   1 hour growing by 1.5 until 16 hours, then every 6 hours; the address times out when
//!   it has been failing for more than 4 days. A retry time only makes the message
//!   eligible: the queue runner (`exim -bd -q30m`, also Debian's default interval) tries it
//!   at its next run.
//! - **Exchange / Microsoft 365**: `TransientFailureRetryCount` 6 retries
//!   `TransientFailureRetryInterval` (5 minutes) apart, then every `MessageRetryInterval`
//!   (15 minutes, the documented default of Exchange 2013 and later) until
//!   `MessageExpirationTimeout` (2 days). How Exchange spaces retries after a 4xx reply to
//!   RCPT is not documented in more detail; this is the model the names suggest.
//! - **Sendmail**: every queue run (`-q30m`, the interval sendmail's operations guide
//!   uses) retries every queued message; `Timeout.queuereturn` (5 days) ends it.
//! - **Spam software**: `never` retries; `custom` gaps (e.g. one retry after 45 s); `fixed`
//!   intervals until a deadline.

use serde::Serialize;

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// One Exim retry rule item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EximRule {
    /// `F,cutoff,interval`: fixed interval.
    Fixed { cutoff: u64, interval: u64 },
    /// `G,cutoff,first,factor`: geometric from `first`, factor in thousandths.
    Geometric {
        cutoff: u64,
        first: u64,
        factor_milli: u64,
    },
}

impl EximRule {
    fn cutoff(self) -> u64 {
        match self {
            EximRule::Fixed { cutoff, .. } | EximRule::Geometric { cutoff, .. } => cutoff,
        }
    }
}

/// Exim's default retry rule `F,2h,15m; G,16h,1h,1.5; F,4d,6h`.
pub const EXIM_DEFAULT_RULES: [EximRule; 3] = [
    EximRule::Fixed {
        cutoff: 2 * HOUR,
        interval: 15 * MINUTE,
    },
    EximRule::Geometric {
        cutoff: 16 * HOUR,
        first: HOUR,
        factor_milli: 1500,
    },
    EximRule::Fixed {
        cutoff: 4 * DAY,
        interval: 6 * HOUR,
    },
];

/// Exim's `retry_interval_max` default: no gap is longer than a day.
const EXIM_RETRY_INTERVAL_MAX: u64 = DAY;

/// How a sender retries a deferred message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Postfix {
        min_backoff: u64,
        max_backoff: u64,
        queue_run: u64,
        lifetime: u64,
    },
    Exim {
        rules: Vec<EximRule>,
        /// Queue runner interval; 0: retries happen exactly at the retry time.
        queue_run: u64,
    },
    Exchange {
        transient_count: u32,
        transient_interval: u64,
        retry_interval: u64,
        expiration: u64,
    },
    Sendmail {
        queue_run: u64,
        lifetime: u64,
    },
    /// Every `every` seconds until `give_up` seconds after the first attempt.
    Fixed {
        every: u64,
        give_up: u64,
    },
    /// Gaps between consecutive attempts; gives up after the last.
    Custom {
        gaps: Vec<u64>,
    },
    /// A single attempt.
    Never,
}

impl Schedule {
    pub fn postfix() -> Self {
        Schedule::Postfix {
            min_backoff: 300,
            max_backoff: 4000,
            queue_run: 300,
            lifetime: 5 * DAY,
        }
    }

    pub fn exim() -> Self {
        Schedule::Exim {
            rules: EXIM_DEFAULT_RULES.to_vec(),
            queue_run: 30 * MINUTE,
        }
    }

    pub fn exchange() -> Self {
        Schedule::Exchange {
            transient_count: 6,
            transient_interval: 5 * MINUTE,
            retry_interval: 15 * MINUTE,
            expiration: 2 * DAY,
        }
    }

    pub fn sendmail() -> Self {
        Schedule::Sendmail {
            queue_run: 30 * MINUTE,
            lifetime: 5 * DAY,
        }
    }

    /// The schedule's short name, as scenarios write it.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Postfix { .. } => "postfix",
            Schedule::Exim { .. } => "exim",
            Schedule::Exchange { .. } => "exchange",
            Schedule::Sendmail { .. } => "sendmail",
            Schedule::Fixed { .. } => "fixed",
            Schedule::Custom { .. } => "custom",
            Schedule::Never => "never",
        }
    }

    /// The queue runner interval, for schedules that retry only at queue runs.
    pub fn queue_run(&self) -> u64 {
        match self {
            Schedule::Postfix { queue_run, .. }
            | Schedule::Exim { queue_run, .. }
            | Schedule::Sendmail { queue_run, .. } => *queue_run,
            _ => 0,
        }
    }

    /// The latest the first retry can come (the queue runner's phase at its worst): the
    /// "one retry interval" that a greylisting delay should not exceed. `None`: no retry.
    pub fn first_retry_bound(&self) -> Option<u64> {
        (0..self.queue_run().max(1))
            .filter_map(|phase| self.attempts(phase).next_after_failure(0))
            .max()
    }

    /// The attempts of one message; `phase` (taken modulo the queue run interval) is where
    /// the sender's queue runner cycle stands when the message arrives: the first run comes
    /// `queue_run - phase` seconds later.
    pub fn attempts(&self, phase: u64) -> Attempts<'_> {
        let q = self.queue_run();
        Attempts {
            schedule: self,
            phase: if q == 0 { 0 } else { phase % q },
            n: 0,
            last_gap: 0,
        }
    }
}

/// The retry cursor of one message.
#[derive(Debug, Clone)]
pub struct Attempts<'a> {
    schedule: &'a Schedule,
    phase: u64,
    /// Failed attempts so far.
    n: u32,
    /// Exim: the previous gap (the smaller of predicted and actual, as `retry.c` keeps it).
    last_gap: u64,
}

impl Attempts<'_> {
    /// The first queue run at or after `due`; runs happen at `k * queue_run - phase`.
    fn run_at_or_after(&self, due: u64) -> u64 {
        let q = self.schedule.queue_run();
        if q == 0 {
            return due;
        }
        // Runs at times t with (t + phase) % q == 0.
        let shifted = due + self.phase;
        shifted.div_ceil(q) * q - self.phase
    }

    /// The attempt failed at `now`: when is the next one? `None`: the sender gives up.
    pub fn next_after_failure(&mut self, now: u64) -> Option<u64> {
        self.n += 1;
        let next = match self.schedule {
            Schedule::Postfix {
                min_backoff,
                max_backoff,
                lifetime,
                ..
            } => {
                if now >= *lifetime {
                    return None;
                }
                let backoff = now.clamp(*min_backoff, *max_backoff);
                self.run_at_or_after(now + backoff)
            }
            Schedule::Exim { rules, .. } => {
                // Failing for `now` seconds (the message's first attempt was the first failure).
                let rule = rules.iter().find(|r| now <= r.cutoff())?;
                let gap = match *rule {
                    EximRule::Fixed { interval, .. } => interval,
                    EximRule::Geometric {
                        first,
                        factor_milli,
                        ..
                    } => {
                        if self.last_gap < first {
                            first
                        } else {
                            self.last_gap * factor_milli / 1000
                        }
                    }
                }
                .min(EXIM_RETRY_INTERVAL_MAX);
                let at = self.run_at_or_after(now + gap);
                self.last_gap = gap.min(at - now);
                at
            }
            Schedule::Exchange {
                transient_count,
                transient_interval,
                retry_interval,
                expiration,
            } => {
                let gap = if self.n <= *transient_count {
                    *transient_interval
                } else {
                    *retry_interval
                };
                let at = now + gap;
                if at > *expiration {
                    return None;
                }
                at
            }
            Schedule::Sendmail { lifetime, .. } => {
                if now >= *lifetime {
                    return None;
                }
                self.run_at_or_after(now + 1)
            }
            Schedule::Fixed { every, give_up } => {
                let at = now + every;
                if at > *give_up {
                    return None;
                }
                at
            }
            Schedule::Custom { gaps } => now + gaps.get(self.n as usize - 1)?,
            Schedule::Never => return None,
        };
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every attempt time while each attempt fails, up to `limit` attempts.
    fn times(s: &Schedule, phase: u64, limit: usize) -> Vec<u64> {
        let mut a = s.attempts(phase);
        let mut out = vec![0];
        while out.len() < limit {
            match a.next_after_failure(*out.last().unwrap()) {
                Some(t) => out.push(t),
                None => break,
            }
        }
        out
    }

    #[test]
    fn postfix_doubles_from_300_to_4000_on_queue_runs() {
        // Queue runs exactly at arrival + k * 300.
        let t = times(&Schedule::postfix(), 0, 9);
        assert_eq!(t, [0, 300, 600, 1200, 2400, 4800, 9000, 13200, 17400]);
        // A run 100 s after arrival: each retry waits for the next run.
        let t = times(&Schedule::postfix(), 200, 6);
        assert_eq!(t, [0, 400, 1000, 2200, 4600, 8800]);
        // Gives up after the first failure past 5 days.
        let all = times(&Schedule::postfix(), 0, 1000);
        let last = *all.last().unwrap();
        assert!((5 * DAY..5 * DAY + 4300).contains(&last), "{last}");
        assert_eq!(Schedule::postfix().first_retry_bound(), Some(599));
    }

    #[test]
    fn exim_default_rule() {
        let exact = Schedule::Exim {
            rules: EXIM_DEFAULT_RULES.to_vec(),
            queue_run: 0,
        };
        let t = times(&exact, 0, 16);
        let m = MINUTE;
        let h = HOUR;
        assert_eq!(
            t,
            [
                0,
                15 * m,
                30 * m,
                45 * m,
                60 * m,
                75 * m,
                90 * m,
                105 * m,
                120 * m,
                // 120 min is still within F,2h; then G: 1 h, 1.5 h, 2.25 h, 3.375 h, 5.0625 h.
                135 * m,
                135 * m + h,
                135 * m + h + 90 * m,
                135 * m + h + 90 * m + 135 * m,
                135 * m + h + 90 * m + 135 * m + 12150,
                135 * m + h + 90 * m + 135 * m + 12150 + 18225,
                // Failing 15.4 h <= 16 h: one more geometric gap (7.6 h), then F,4d,6h.
                135 * m + h + 90 * m + 135 * m + 12150 + 18225 + 27337,
            ]
        );
        let all = times(&exact, 0, 1000);
        let last = *all.last().unwrap();
        assert!(
            (4 * DAY - 6 * h + 1..=4 * DAY + 6 * h).contains(&last),
            "{last}"
        );
        // With the queue runner every 30 minutes, 15-minute retries wait for the next run.
        let t = times(&Schedule::exim(), 0, 6);
        assert_eq!(t, [0, 30 * m, 60 * m, 90 * m, 120 * m, 150 * m]);
    }

    #[test]
    fn exchange_transient_then_message_retry() {
        let t = times(&Schedule::exchange(), 0, 10);
        let m = MINUTE;
        assert_eq!(
            t,
            [
                0,
                5 * m,
                10 * m,
                15 * m,
                20 * m,
                25 * m,
                30 * m,
                45 * m,
                60 * m,
                75 * m
            ]
        );
        let all = times(&Schedule::exchange(), 0, 1000);
        assert_eq!(*all.last().unwrap(), 2 * DAY);
        assert_eq!(Schedule::exchange().first_retry_bound(), Some(5 * m));
    }

    #[test]
    fn sendmail_every_queue_run() {
        let m = MINUTE;
        let t = times(&Schedule::sendmail(), 0, 4);
        assert_eq!(t, [0, 30 * m, 60 * m, 90 * m]);
        // The first run 10 minutes after arrival.
        let t = times(&Schedule::sendmail(), 20 * m, 4);
        assert_eq!(t, [0, 10 * m, 40 * m, 70 * m]);
        let all = times(&Schedule::sendmail(), 0, 10_000);
        assert_eq!(*all.last().unwrap(), 5 * DAY);
    }

    #[test]
    fn spam_schedules() {
        assert_eq!(times(&Schedule::Never, 0, 10), [0]);
        assert_eq!(times(&Schedule::Custom { gaps: vec![45] }, 0, 10), [0, 45]);
        assert_eq!(
            times(
                &Schedule::Fixed {
                    every: 600,
                    give_up: 3 * HOUR
                },
                0,
                100
            )
            .len(),
            19
        );
        assert_eq!(Schedule::Never.first_retry_bound(), None);
    }
}
