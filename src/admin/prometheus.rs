//! Prometheus text exposition (format 0.0.4) of the service's counters.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::engine::{Rule, Verdict};
use crate::metrics::HistogramSnapshot;
use crate::service::Greylister;
use crate::store::Counts;

/// The content type scrapers expect.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (bound, n) in &h.cumulative {
            let le = if bound.is_infinite() {
                "+Inf".to_string()
            } else {
                bound.to_string()
            };
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, n);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric; `counts` are the store's entries (None when it cannot say now).
pub fn render(svc: &Greylister, counts: Option<Counts>, now: u64) -> String {
    let m = &svc.metrics;
    let mut o = Out(String::with_capacity(8192));

    o.head(
        "greygate_build_info",
        "gauge",
        "Version of the running greygate.",
    );
    o.sample(
        "greygate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    o.head(
        "greygate_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
    );
    o.sample("greygate_start_time_seconds", &[], svc.started_at);
    o.head(
        "greygate_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    o.sample(
        "greygate_uptime_seconds",
        &[],
        now.saturating_sub(svc.started_at),
    );
    let live = svc.live();
    o.head(
        "greygate_learn_mode",
        "gauge",
        "1 when decisions are only logged (learn mode), 0 when enforced.",
    );
    o.sample(
        "greygate_learn_mode",
        &[],
        u8::from(live.options.mode == crate::engine::Mode::Learn),
    );

    o.head(
        "greygate_decisions_total",
        "counter",
        "Answers given, by the verdict the MTA got and the rule that decided.",
    );
    let all = m.decisions();
    for rule in Rule::ALL {
        for v in [Verdict::Pass, Verdict::Defer, Verdict::Skip] {
            let n = all
                .iter()
                .find(|(r, vv, _)| *r == rule && *vv == v)
                .map_or(0, |x| x.2);
            if n > 0 || possible(rule, v) {
                o.sample(
                    "greygate_decisions_total",
                    &[("verdict", v.as_str()), ("rule", rule.as_str())],
                    n,
                );
            }
        }
    }
    o.head(
        "greygate_learn_would_defer_total",
        "counter",
        "Requests learn mode accepted that enforce mode would have deferred.",
    );
    o.sample(
        "greygate_learn_would_defer_total",
        &[],
        m.learn_would_defer.load(Ordering::Relaxed),
    );
    o.head(
        "greygate_decision_duration_seconds",
        "histogram",
        "Time to decide one request, store included.",
    );
    o.histogram(
        "greygate_decision_duration_seconds",
        &[],
        &m.decision_seconds.snapshot(),
    );

    o.head(
        "greygate_store_available",
        "gauge",
        "1 when the store is open and writing, 0 while the daemon answers per fail_mode or \
         its commits fail.",
    );
    o.sample(
        "greygate_store_available",
        &[],
        u8::from(svc.store.available()),
    );
    let health = svc.store.health().unwrap_or_default();
    o.head(
        "greygate_store_writes_failing",
        "gauge",
        "1 while the store's commits fail (answers come from memory; changes wait there).",
    );
    o.sample(
        "greygate_store_writes_failing",
        &[],
        u8::from(health.writes_failing),
    );
    o.head(
        "greygate_store_failed_commits_total",
        "counter",
        "Commits of the embedded store that failed.",
    );
    o.sample(
        "greygate_store_failed_commits_total",
        &[],
        health.failed_commits,
    );
    o.head(
        "greygate_store_pending_changes",
        "gauge",
        "Changes in memory that the last failed commit could not write.",
    );
    o.sample(
        "greygate_store_pending_changes",
        &[],
        health.pending_changes,
    );
    o.head(
        "greygate_store_file_set_aside",
        "gauge",
        "1 when the store file could not be read at start and was set aside: the store \
         started empty.",
    );
    o.sample(
        "greygate_store_file_set_aside",
        &[],
        u8::from(health.set_aside.is_some()),
    );
    o.head(
        "greygate_store_operations_total",
        "counter",
        "Store operations completed on behalf of requests.",
    );
    let ops = m.store_ops();
    for (op, n, _) in &ops {
        o.sample("greygate_store_operations_total", &[("op", op.as_str())], n);
    }
    o.head(
        "greygate_store_operation_duration_seconds",
        "histogram",
        "Latency of completed store operations.",
    );
    for (op, _, h) in &ops {
        o.histogram(
            "greygate_store_operation_duration_seconds",
            &[("op", op.as_str())],
            h,
        );
    }
    o.head(
        "greygate_store_errors_total",
        "counter",
        "Store operations that failed, by kind of failure.",
    );
    for (kind, n) in m.store_errors() {
        o.sample("greygate_store_errors_total", &[("kind", kind)], n);
    }
    o.head(
        "greygate_fail_open_total",
        "counter",
        "Requests accepted because the store failed (fail_mode = open).",
    );
    o.sample(
        "greygate_fail_open_total",
        &[],
        m.fail_open.load(Ordering::Relaxed),
    );
    o.head(
        "greygate_fail_closed_total",
        "counter",
        "Requests deferred because the store failed (fail_mode = closed).",
    );
    o.sample(
        "greygate_fail_closed_total",
        &[],
        m.fail_closed.load(Ordering::Relaxed),
    );
    if let Some(c) = counts {
        o.head(
            "greygate_entries",
            "gauge",
            "Records in the store by state.",
        );
        o.sample(
            "greygate_entries",
            &[("state", "pending")],
            c.triplets_pending,
        );
        o.sample(
            "greygate_entries",
            &[("state", "passed")],
            c.triplets_passed,
        );
        o.sample("greygate_entries", &[("state", "clients")], c.clients);
    }
    if let Some(cap) = svc.store.get().ok().and_then(|s| s.capacity()) {
        o.head(
            "greygate_store_entries_max",
            "gauge",
            "Most records the store holds (max_entries; 0: no cap).",
        );
        o.sample("greygate_store_entries_max", &[], cap.max_entries);
        o.head(
            "greygate_store_evictions_total",
            "counter",
            "Records evicted because the store was at max_entries, by kind.",
        );
        for (kind, n) in [
            ("pending", cap.evicted_pending),
            ("passed", cap.evicted_passed),
            ("client", cap.evicted_clients),
        ] {
            o.sample("greygate_store_evictions_total", &[("kind", kind)], n);
        }
    }

    o.head(
        "greygate_connections_open",
        "gauge",
        "Open connections per listener.",
    );
    let listeners = svc.listeners();
    for l in &listeners {
        o.sample(
            "greygate_connections_open",
            &[("listener", &l.address), ("protocol", l.protocol)],
            l.open.load(Ordering::Relaxed),
        );
    }
    o.head(
        "greygate_connections_limit",
        "gauge",
        "Connection limit per listener.",
    );
    for l in &listeners {
        o.sample(
            "greygate_connections_limit",
            &[("listener", &l.address), ("protocol", l.protocol)],
            l.limit,
        );
    }
    o.head(
        "greygate_connections_accepted_total",
        "counter",
        "Connections accepted per listener.",
    );
    for l in &listeners {
        o.sample(
            "greygate_connections_accepted_total",
            &[("listener", &l.address), ("protocol", l.protocol)],
            l.accepted.load(Ordering::Relaxed),
        );
    }
    o.head(
        "greygate_connections_refused_total",
        "counter",
        "New connections closed at once: listener or peer at its limit with no idle connection to close, or out of file descriptors.",
    );
    for l in &listeners {
        o.sample(
            "greygate_connections_refused_total",
            &[("listener", &l.address), ("protocol", l.protocol)],
            l.refused.load(Ordering::Relaxed),
        );
    }
    o.head(
        "greygate_connections_evicted_total",
        "counter",
        "Idle connections closed to make room for a new one (listener or peer at its limit).",
    );
    for l in &listeners {
        o.sample(
            "greygate_connections_evicted_total",
            &[("listener", &l.address), ("protocol", l.protocol)],
            l.evicted.load(Ordering::Relaxed),
        );
    }

    o.head(
        "greygate_runtime_entries",
        "gauge",
        "Operator allow/deny entries in force.",
    );
    let runtime = live.engine.runtime.entries();
    for list in [
        crate::engine::ListKind::Allow,
        crate::engine::ListKind::Deny,
    ] {
        let n = runtime.iter().filter(|e| e.list == list).count();
        o.sample("greygate_runtime_entries", &[("list", list.as_str())], n);
    }
    let dns = &m.dns;
    for (name, help, v) in [
        (
            "greygate_dns_gathers_total",
            "Requests whose DNS facts were gathered.",
            &dns.gathers,
        ),
        (
            "greygate_dns_lookups_total",
            "DNS fact lookups sent (SPF check, host name check, one DNS list zone).",
            &dns.lookups,
        ),
        (
            "greygate_dns_cache_hits_total",
            "DNS fact lookups answered from the cache.",
            &dns.cache_hits,
        ),
        (
            "greygate_dns_timeouts_total",
            "DNS fact lookups unanswered when the request's budget ran out.",
            &dns.timeouts,
        ),
        (
            "greygate_dns_failures_total",
            "DNS fact lookups that failed (server failure, network error).",
            &dns.failures,
        ),
        (
            "greygate_dns_skipped_total",
            "DNS fact lookups not made because the resolver was not answering (breaker open).",
            &dns.skipped,
        ),
        (
            "greygate_dns_breaker_opened_total",
            "Times the resolver stopped answering and requests stopped asking it.",
            &dns.breaker_opened,
        ),
    ] {
        o.head(name, "counter", help);
        o.sample(name, &[], v.get());
    }
    o.head(
        "greygate_dns_resolver_down",
        "gauge",
        "1 while the DNS resolver is considered down (breaker open: requests do not ask it), else 0.",
    );
    o.sample(
        "greygate_dns_resolver_down",
        &[],
        dns.resolver_down.load(Ordering::Relaxed),
    );
    o.head(
        "greygate_dns_gather_seconds",
        "histogram",
        "Time spent gathering DNS facts, per request.",
    );
    o.histogram(
        "greygate_dns_gather_seconds",
        &[],
        &dns.gather_seconds.snapshot(),
    );
    let smtp = &m.smtp;
    for (name, help, v) in [
        (
            "greygate_smtp_sessions_total",
            "SMTP front sessions started.",
            &smtp.sessions,
        ),
        (
            "greygate_smtp_pregreets_total",
            "SMTP clients caught talking before the banner ended (rule pregreet).",
            &smtp.pregreets,
        ),
        (
            "greygate_smtp_trap_hits_total",
            "RCPTs to a greytrap address (the client is denied for [smtp] trap_deny_for).",
            &smtp.trap_hits,
        ),
        (
            "greygate_smtp_tarpitted_total",
            "SMTP sessions whose replies were slowed down.",
            &smtp.tarpitted,
        ),
        (
            "greygate_smtp_error_disconnects_total",
            "SMTP sessions closed for too many errors.",
            &smtp.error_disconnects,
        ),
        (
            "greygate_smtp_backend_failures_total",
            "Times the SMTP backend could not be reached or stopped answering.",
            &smtp.backend_failures,
        ),
        (
            "greygate_smtp_backend_connections_total",
            "Backend sessions the SMTP front opened for clients.",
            &smtp.backend_connections,
        ),
        (
            "greygate_smtp_backend_reuses_total",
            "Idle backend sessions the SMTP front took from its pool for a client.",
            &smtp.backend_reuses,
        ),
        (
            "greygate_smtp_messages_total",
            "Messages relayed through the SMTP front and accepted by the backend.",
            &smtp.messages,
        ),
        (
            "greygate_smtp_message_bytes_total",
            "Bytes of messages relayed through the SMTP front and accepted by the backend.",
            &smtp.message_bytes,
        ),
        (
            "greygate_smtp_tls_sessions_total",
            "SMTP sessions that started TLS.",
            &smtp.tls_sessions,
        ),
    ] {
        o.head(name, "counter", help);
        o.sample(name, &[], v.load(Ordering::Relaxed));
    }
    o.head(
        "greygate_config_reloads_total",
        "counter",
        "Configuration reloads applied.",
    );
    o.sample(
        "greygate_config_reloads_total",
        &[],
        m.reloads.load(Ordering::Relaxed),
    );
    o.head(
        "greygate_config_reload_failures_total",
        "counter",
        "Configuration reloads refused (the running configuration stayed).",
    );
    o.sample(
        "greygate_config_reload_failures_total",
        &[],
        m.reload_failures.load(Ordering::Relaxed),
    );
    o.head(
        "greygate_released_triplets_total",
        "counter",
        "Pending triplets an operator released through the admin API (next retry passes).",
    );
    o.sample(
        "greygate_released_triplets_total",
        &[],
        m.released.load(Ordering::Relaxed),
    );
    o.0
}

/// Series worth exporting at zero so that `rate()` works from the first scrape.
fn possible(rule: Rule, v: Verdict) -> bool {
    matches!(
        (rule, v),
        (
            Rule::New | Rule::Throttled | Rule::EarlyRetry | Rule::Deny,
            Verdict::Defer
        ) | (
            Rule::Delayed | Rule::Known | Rule::Released | Rule::AutoAllow,
            Verdict::Pass
        ) | (Rule::StoreFailOpen, Verdict::Pass)
            | (Rule::StoreFailClosed, Verdict::Defer)
    )
}
