//! The JSON API and `/metrics`. Reads never change state; changes are POST/DELETE and need
//! the token (checked by the guard in `mod.rs`). Every request and answer is a type of
//! `wire.rs`, which the CLI reads with.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};

use super::entries::{self, EntryQuery};
use super::wire::{
    AddEntry, EntriesPage, EntriesQuery, ExplainAnswer, ExplainQuery, LimitQuery, ListenerView,
    PolicyView, PurgeRequest, Recent, ReleaseRequest, Removed, RuleCount, RuntimeList, Series,
    SeriesQuery, StatsView, Top, ValueQuery,
};
use super::{AdminState, error, prometheus};
use crate::engine::{ListKind, Request, Verdict};
use crate::service::{EntriesError, Selector, unix_now};
use crate::store::{Counts, StoreError};

/// How long the store's record counts are reused (counting can be slow on big shared stores).
const COUNTS_TTL: Duration = Duration::from_secs(5);

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .route("/api/stats", get(stats))
        .route("/api/explain", get(explain))
        .route("/api/recent", get(recent))
        .route("/api/series", get(series))
        .route("/api/top", get(top))
        .route("/api/runtime", get(list_runtime))
        .route(
            "/api/runtime/{list}",
            post(add_runtime).delete(remove_runtime_by_value),
        )
        .route("/api/runtime/{list}/{id}", delete(remove_runtime_by_id))
        .route("/api/reload", post(reload))
        .route("/api/entries", get(entries))
        .route("/api/purge", post(purge))
        .route("/api/release", post(release))
}

/// The store's record counts, cached briefly; `None` when the store cannot answer now.
pub(super) async fn counts(st: &AdminState) -> Option<Counts> {
    let mut cache = st.counts_cache.lock().await;
    if let Some((at, c)) = *cache
        && at.elapsed() < COUNTS_TTL
    {
        return Some(c);
    }
    let store = st.svc.store.get().ok()?;
    let c = tokio::time::timeout(Duration::from_secs(2), store.counts())
        .await
        .ok()?
        .ok()?;
    *cache = Some((Instant::now(), c));
    Some(c)
}

async fn metrics(State(st): State<Arc<AdminState>>) -> Response {
    let counts = counts(&st).await;
    let body = prometheus::render(&st.svc, counts, unix_now());
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], body).into_response()
}

async fn health(State(st): State<Arc<AdminState>>) -> Response {
    // Still answering (per fail_mode, or from memory), but an operator should look.
    match st.svc.store.health() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
        Some(h) if h.writes_failing => {
            (StatusCode::SERVICE_UNAVAILABLE, "store writes failing\n").into_response()
        }
        Some(h) if h.server_unreachable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store server unreachable\n",
        )
            .into_response(),
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn stats(State(st): State<Arc<AdminState>>) -> Json<StatsView> {
    let svc = &st.svc;
    let m = &svc.metrics;
    let now = unix_now();
    let live = svc.live();
    let p = &live.engine.policy;
    let h = m.decision_seconds.snapshot();
    let p99 = (h.count > 0).then(|| {
        let want = (h.count as f64 * 0.99).ceil() as u64;
        h.cumulative
            .iter()
            .find(|(_, n)| *n >= want)
            .map_or(f64::INFINITY, |(b, _)| *b)
    });
    Json(StatsView {
        version: env!("CARGO_PKG_VERSION").into(),
        now,
        started_at: svc.started_at,
        uptime_seconds: now.saturating_sub(svc.started_at),
        mode: live.options.mode,
        store: svc
            .store
            .get()
            .map_or_else(|e| e.to_string(), |s| s.describe()),
        store_available: svc.store.available(),
        store_health: svc.store.health(),
        entries: counts(&st).await,
        capacity: svc.store.get().ok().and_then(|s| s.capacity()),
        pass: m.verdict_total(Verdict::Pass),
        defer: m.verdict_total(Verdict::Defer),
        skip: m.verdict_total(Verdict::Skip),
        fail_open: m.fail_open.load(Ordering::Relaxed),
        fail_closed: m.fail_closed.load(Ordering::Relaxed),
        learn_would_defer: m.learn_would_defer.load(Ordering::Relaxed),
        decisions: m
            .decisions()
            .into_iter()
            .map(|(rule, verdict, count)| RuleCount {
                rule: rule.as_str().into(),
                verdict,
                count,
            })
            .collect(),
        decision_p99_seconds: p99.filter(|v| v.is_finite()),
        listeners: svc
            .listeners()
            .iter()
            .map(|l| ListenerView {
                address: l.address.clone(),
                protocol: l.protocol.into(),
                open: l.open.load(Ordering::Relaxed),
                limit: l.limit,
                accepted: l.accepted.load(Ordering::Relaxed),
                refused: l.refused.load(Ordering::Relaxed),
            })
            .collect(),
        runtime_entries: live.engine.runtime.entries().len(),
        reloads: m.reloads.load(Ordering::Relaxed),
        reload_failures: m.reload_failures.load(Ordering::Relaxed),
        policy: PolicyView {
            delay: p.delay,
            retry_window: p.retry_window,
            max_age: p.max_age,
            auto_allow_after: p.auto_allow_after,
            auto_allow_lifetime: p.auto_allow_lifetime,
            ipv4_prefix: p.ipv4_prefix,
            ipv6_prefix: p.ipv6_prefix,
            new_triplets_per_client: p.new_triplets_per_client,
            new_triplets_window: p.new_triplets_window,
        },
    })
}

async fn explain(State(st): State<Arc<AdminState>>, Query(q): Query<ExplainQuery>) -> Response {
    let Ok(ip) = q.client.trim().parse::<IpAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("client {:?} is not an IP address", q.client),
        );
    };
    let now = match q.at.as_deref().filter(|s| !s.is_empty()) {
        None => unix_now(),
        Some(s) => match crate::service::explain::parse_time(s) {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
    };
    let req = Request {
        stage: "RCPT".into(),
        client_ip: Some(ip),
        client_name: q
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "unknown".into()),
        helo: String::new(),
        sender: crate::engine::normalize::strip_envelope(q.from.trim()).to_string(),
        recipient: crate::engine::normalize::strip_envelope(q.to.trim()).to_string(),
        sasl_username: q.sasl_user,
        ..Request::default()
    };
    let live = st.svc.live();
    let store = st.svc.store.get();
    let store_ref = match &store {
        Ok(s) => Ok(s.as_ref()),
        Err(e) => Err(e.to_string()),
    };
    let mode = live.options.mode;
    let replies = st.control.replies();
    let dns = live.dns.as_deref();
    let throttle = Some(&st.svc.throttle);
    let result =
        crate::service::explain::explain(&live.engine, store_ref, throttle, dns, &req, now, |d| {
            replies.action_text(d, d.enforced(mode), now)
        })
        .await;
    match result {
        Ok(explanation) => Json(ExplainAnswer {
            text: explanation.to_text(),
            explanation,
        })
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn recent(State(st): State<Arc<AdminState>>, Query(q): Query<LimitQuery>) -> Json<Recent> {
    Json(st.svc.activity.recent(q.limit.unwrap_or(50).min(200)))
}

async fn series(State(st): State<Arc<AdminState>>, Query(q): Query<SeriesQuery>) -> Json<Series> {
    let seconds = q.seconds.unwrap_or(3600).clamp(10, 3600);
    Json(Series {
        bucket_seconds: crate::metrics::BUCKET_SECONDS,
        buckets: st.svc.activity.series(unix_now(), seconds),
    })
}

async fn top(State(st): State<Arc<AdminState>>, Query(q): Query<LimitQuery>) -> Json<Top> {
    let (client_groups, sender_domains) = st.svc.activity.top(q.limit.unwrap_or(10).min(100));
    Json(Top {
        client_groups,
        sender_domains,
    })
}

async fn list_runtime(State(st): State<Arc<AdminState>>) -> Json<RuntimeList> {
    let now = unix_now();
    let entries = st
        .svc
        .list_entries()
        .await
        .into_iter()
        .filter(|e| e.alive(now))
        .collect();
    Json(RuntimeList { now, entries })
}

fn list_kind(s: &str) -> Result<ListKind, Box<Response>> {
    match s {
        "allow" => Ok(ListKind::Allow),
        "deny" => Ok(ListKind::Deny),
        _ => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no runtime list {s:?}: use allow or deny"),
        ))),
    }
}

fn entries_error(e: EntriesError) -> Response {
    let status = match &e {
        EntriesError::Invalid { .. } | EntriesError::Full => StatusCode::BAD_REQUEST,
        EntriesError::NotFound { .. } => StatusCode::NOT_FOUND,
        EntriesError::Read { .. } | EntriesError::Write { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        EntriesError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

async fn add_runtime(
    State(st): State<Arc<AdminState>>,
    Path(list): Path<String>,
    body: Result<Json<AddEntry>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let list = match list_kind(&list) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Json(a) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let ttl = a.ttl.map(|d| d.0.as_secs().max(1));
    match st
        .svc
        .add_entry(list, a.target, &a.value, ttl, &a.comment, unix_now())
        .await
    {
        Ok(e) => (StatusCode::CREATED, Json(e)).into_response(),
        Err(e) => entries_error(e),
    }
}

async fn remove_runtime_by_value(
    State(st): State<Arc<AdminState>>,
    Path(list): Path<String>,
    Query(q): Query<ValueQuery>,
) -> Response {
    remove_runtime(&st, &list, Selector::Value(q.value)).await
}

async fn remove_runtime_by_id(
    State(st): State<Arc<AdminState>>,
    Path((list, id)): Path<(String, u64)>,
) -> Response {
    remove_runtime(&st, &list, Selector::Id(id)).await
}

async fn remove_runtime(st: &AdminState, list: &str, sel: Selector) -> Response {
    let list = match list_kind(list) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    match st.svc.remove_entries(list, &sel, unix_now()).await {
        Ok(removed) => Json(Removed { removed }).into_response(),
        Err(e) => entries_error(e),
    }
}

async fn reload(State(st): State<Arc<AdminState>>) -> Response {
    match st.control.reload("admin API").await {
        Ok(report) => Json(report).into_response(),
        Err(why) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, the running configuration stays: {why}"),
        ),
    }
}

/// The filter part of an entries page request.
fn entry_query(q: &EntriesQuery) -> EntryQuery {
    EntryQuery {
        kind: q.kind.clone(),
        state: q.state.clone(),
        client: q.client.clone(),
        sender: q.sender.clone(),
        recipient: q.recipient.clone(),
    }
}

async fn entries(
    State(st): State<Arc<AdminState>>,
    q: Result<Query<EntriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let live = st.svc.live();
    let m = match entry_query(&q).matcher(&live.engine) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = match st.svc.store.get() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let limit = q.limit.unwrap_or(entries::DEFAULT_LIMIT);
    let now = unix_now();
    // Half the request's time, as purge: the page is answered well before the timeout.
    let budget = entries::ListBudget {
        time: st.request_timeout / 2,
        ..entries::ListBudget::default()
    };
    match entries::list(store.as_ref(), &m, q.cursor.as_deref(), limit, now, budget).await {
        Ok(page) => Json(EntriesPage {
            now,
            entries: page.entries,
            next: page.next,
            budget_spent: page.budget_spent,
        })
        .into_response(),
        // The caller's cursor, not the store, is wrong: a retry would fail the same way.
        Err(e @ StoreError::BadCursor(_)) => error(
            StatusCode::BAD_REQUEST,
            format!("{e}; start without a cursor, then pass each page's \"next\""),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn purge(
    State(st): State<Arc<AdminState>>,
    body: Result<Json<PurgeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let query = EntryQuery {
        kind: b.kind,
        state: b.state,
        client: b.client,
        sender: b.sender,
        recipient: b.recipient,
    };
    if !b.all && !query.is_narrowed() {
        return error(
            StatusCode::BAD_REQUEST,
            "name a state, client, sender or recipient, or set \"all\": true",
        );
    }
    let live = st.svc.live();
    let m = match query.matcher(&live.engine) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = match st.svc.store.get() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let budget = st.request_timeout / 2;
    match entries::purge(store.as_ref(), &m, unix_now(), budget).await {
        Ok(r) => {
            tracing::info!(removed = r.removed, complete = r.complete, query = ?query, "records purged");
            Json(r).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /api/release`: marks pending triplets passed so their next retry is accepted at
/// once. Audited: one `released` line names who (the token's holder, from which peer, and
/// the user the caller says it acts for), when, and the triplets.
async fn release(
    State(st): State<Arc<AdminState>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<ReleaseRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let live = st.svc.live();
    let now = unix_now();
    let mut target = match entries::ReleaseTarget::of(&b, &live.engine) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // A client IP names its group; the engine may have keyed the triplet by the identity
    // the client's DNS facts give (`spf:`, `org:`): that key is released too.
    let ip = b
        .client
        .as_deref()
        .and_then(|c| c.trim().parse::<IpAddr>().ok());
    if let (Some(ip), Some(sender), Some(dns)) = (ip, b.sender.as_deref(), live.dns.as_deref()) {
        let req = Request {
            stage: "RCPT".into(),
            client_ip: Some(ip),
            client_name: "unknown".into(),
            sender: crate::engine::normalize::strip_envelope(sender).to_string(),
            recipient: crate::engine::normalize::strip_envelope(&b.recipient).to_string(),
            ..Request::default()
        };
        if let Some((with, _)) = dns.facts_for(&live.engine, &req, now).await {
            let (key, _) =
                live.engine
                    .identified_key(ip, &with.sender, &with.recipient, with.facts.as_ref());
            target.also(key);
        }
    }
    let store = match st.svc.store.get() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let budget = st.request_timeout / 2;
    let done = entries::release(store.as_ref(), &live.engine, &target, now, budget).await;
    let r = done.report;
    st.svc
        .metrics
        .released
        .fetch_add(r.count, Ordering::Relaxed);
    let who = peer.map_or_else(
        || "admin token".to_string(),
        |p| format!("admin token from {}", p.0.0),
    );
    let triplets = entries::keys_text(&r.released, r.count);
    let failed = done.error.as_ref().map(ToString::to_string);
    tracing::info!(
        who = who.as_str(),
        user = b.by.as_deref().unwrap_or("-"),
        at = now,
        count = r.count,
        triplets = triplets.as_str(),
        already_passed = r.already_passed.len(),
        complete = r.complete,
        error = failed.as_deref(),
        "released"
    );
    match failed {
        None => Json(r).into_response(),
        Some(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e} (after releasing {} triplet(s))", r.count),
        ),
    }
}
