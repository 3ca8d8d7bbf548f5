//! The gatherer against DNS servers on loopback made for each test: one that never
//! answers, one that answers late, one that answers at once from a table.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, TXT};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use super::*;

fn settings(server: SocketAddr, budget_ms: u64) -> DnsSettings {
    DnsSettings {
        enabled: true,
        budget: Duration::from_millis(budget_ms),
        resolver: Some(server),
        cache_size: 100,
        ptr_lookup: true,
        dnswl_zones: Vec::new(),
        dnsbl_zones: vec!["bl.test".into()],
    }
}

fn gatherer(s: &DnsSettings) -> (Gatherer, Arc<DnsStats>) {
    let stats = Arc::new(DnsStats::default());
    let g = Gatherer::new(s, "mx.rcpt.test", stats.clone()).expect("gatherer");
    (g, stats)
}

fn ask<'a>(ip: &str, sender: &'a str) -> Ask<'a> {
    Ask {
        ip: ip.parse().unwrap(),
        sender,
        helo: "helo.test",
        client_name: "unknown",
        reverse_client_name: "",
        spf: true,
        name: true,
    }
}

/// A UDP socket that reads nothing and answers nothing: a DNS server that is down or
/// dropped off the network.
async fn silent_server() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

type Table = fn(&Query) -> Option<Vec<RData>>;

/// The response to `q` from `table` (`None`: NXDOMAIN), TTL 60, encoded.
fn answer(q: &Message, table: Table) -> Vec<u8> {
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    match q.queries.first().and_then(table) {
        Some(data) => {
            let name = q.queries[0].name().clone();
            r.add_answers(
                data.into_iter()
                    .map(|d| Record::from_rdata(name.clone(), 60, d)),
            );
        }
        None => r.metadata.response_code = ResponseCode::NXDomain,
    }
    r.to_vec().unwrap()
}

/// Answers every query after `delay` from `table` (`None`: NXDOMAIN), TTL 60.
async fn table_server(delay: Duration, table: Table) -> SocketAddr {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = sock.send_to(&answer(&q, table), peer).await;
            });
        }
    });
    addr
}

fn is(q: &Query, name: &str, t: RecordType) -> bool {
    q.query_type() == t && q.name().to_ascii().eq_ignore_ascii_case(name)
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

fn txt(s: &str) -> RData {
    RData::TXT(TXT::new(vec![s.to_string()]))
}

#[tokio::test]
async fn a_silent_server_costs_the_budget_and_says_nothing() {
    let server = silent_server().await;
    let s = settings(server.local_addr().unwrap(), 200);
    let (g, stats) = gatherer(&s);
    let got = g.gather(&ask("198.51.100.7", "a@pool.test")).await;
    assert!(
        got.elapsed >= Duration::from_millis(200) && got.elapsed < Duration::from_millis(350),
        "{:?}",
        got.elapsed
    );
    let f = &got.facts;
    assert_eq!(f.spf.as_ref().unwrap().result, SpfResult::Timeout);
    assert_eq!(f.spf.as_ref().unwrap().domain, "pool.test");
    assert_eq!(f.name, HostName::Timeout);
    assert!(!f.dnsbl.listed() && !f.dnsbl.complete, "{:?}", f.dnsbl);
    // Nothing listed, nothing clean: the engine falls back to the prefix and the
    // configured delay.
    assert!(f.timed_out());
    assert!(got.timed_out);
    let note = got.note().unwrap();
    assert!(note.starts_with("DNS timed out after 2"), "{note}");
    for part in [
        "spf (timed out)",
        "host name (timed out)",
        "dnsbl bl.test (timed out)",
    ] {
        assert!(note.contains(part), "{note}");
    }
    assert_eq!(stats.timeouts.get(), 3);
    assert_eq!(stats.lookups.get(), 3);
}

#[tokio::test]
async fn names_the_mta_gave_and_the_null_sender_need_no_dns() {
    let server = silent_server().await;
    let mut s = settings(server.local_addr().unwrap(), 200);
    s.dnsbl_zones.clear();
    let (g, stats) = gatherer(&s);
    let got = g
        .gather(&Ask {
            client_name: "MX1.Example.NET.",
            reverse_client_name: "mx1.example.net",
            ..ask("198.51.100.7", "")
        })
        .await;
    assert_eq!(got.facts.name, HostName::Verified("mx1.example.net".into()));
    assert_eq!(got.facts.spf, None);
    assert!(got.facts.dnsbl.clean());
    assert!(got.trouble.is_empty() && got.note().is_none());
    assert!(got.elapsed < Duration::from_millis(50), "{:?}", got.elapsed);

    // Postfix looked and no name confirmed: unverified, still without asking DNS.
    let got = g
        .gather(&Ask {
            reverse_client_name: "unknown",
            ..ask("198.51.100.7", "<>")
        })
        .await;
    assert_eq!(got.facts.name, HostName::Unverified);
    assert_eq!(stats.lookups.get(), 0);
}

#[tokio::test]
async fn a_late_answer_is_cached_for_the_next_request() {
    let addr = table_server(Duration::from_millis(400), |q| {
        is(q, "7.100.51.198.bl.test.", RecordType::A).then(|| vec![a([127, 0, 0, 2])])
    })
    .await;
    let mut s = settings(addr, 150);
    s.dnsbl_zones = vec!["bl.test".into()];
    let (g, stats) = gatherer(&s);
    let quick = |sender| Ask {
        spf: false,
        name: false,
        ..ask("198.51.100.7", sender)
    };
    let first = g.gather(&quick("a@pool.test")).await;
    assert!(!first.facts.dnsbl.listed() && !first.facts.dnsbl.complete);
    assert!(first.timed_out);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = g.gather(&quick("a@pool.test")).await;
    assert_eq!(retry.facts.dnsbl.hits, vec!["bl.test".to_string()]);
    assert!(retry.facts.dnsbl.complete);
    assert!(
        retry.elapsed < Duration::from_millis(50),
        "{:?}",
        retry.elapsed
    );
    assert_eq!(stats.cache_hits.get(), 1);
}

fn records(q: &Query) -> Option<Vec<RData>> {
    let t = q.query_type();
    let name = q.name().to_ascii().to_ascii_lowercase();
    match (name.as_str(), t) {
        ("pool.test.", RecordType::TXT) => Some(vec![txt(
            "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all",
        )]),
        ("open.test.", RecordType::TXT) => Some(vec![txt("v=spf1 +all")]),
        ("bare.test.", RecordType::TXT) => Some(vec![txt("v=spf1 all")]),
        ("everyone.test.", RecordType::TXT) => Some(vec![txt("v=spf1 ip4:0.0.0.0/0 -all")]),
        ("halves.test.", RecordType::TXT) => Some(vec![txt(
            "v=spf1 ip4:0.0.0.0/1 ip4:128.0.0.0/2 ip4:192.0.0.0/3 -all",
        )]),
        ("7.100.51.198.bl.test.", RecordType::A) => Some(vec![a([127, 255, 255, 254])]),
        ("9.113.0.203.bl.test.", RecordType::A) => Some(vec![a([127, 0, 0, 4])]),
        ("7.100.51.198.wl.test.", RecordType::A) => Some(vec![a([127, 0, 10, 2])]),
        _ => None,
    }
}

#[tokio::test]
async fn spf_that_passes_everyone_gives_no_identity() {
    let addr = table_server(Duration::ZERO, records).await;
    let mut s = settings(addr, 2000);
    s.dnsbl_zones.clear();
    let (g, _) = gatherer(&s);
    let spf = |sender: &'static str, ip: &'static str| {
        let g = &g;
        async move {
            let got = g
                .gather(&Ask {
                    name: false,
                    ..ask(ip, sender)
                })
                .await;
            got.facts.spf.expect("checked").result
        }
    };
    assert_eq!(spf("a@pool.test", "198.51.100.7").await, SpfResult::Pass);
    assert_eq!(spf("a@pool.test", "203.0.113.9").await, SpfResult::Pass);
    assert_eq!(spf("a@pool.test", "192.0.2.1").await, SpfResult::Fail);
    assert_eq!(spf("a@open.test", "198.51.100.7").await, SpfResult::PassAny);
    assert_eq!(spf("a@bare.test", "198.51.100.7").await, SpfResult::PassAny);
    assert_eq!(
        spf("a@everyone.test", "198.51.100.7").await,
        SpfResult::PassAny
    );
    // Everything but 240.0.0.0/4: the client's antipode (70.51.100.7) still passes.
    assert_eq!(
        spf("a@halves.test", "198.51.100.7").await,
        SpfResult::PassAny
    );
    assert_eq!(spf("a@none.test", "198.51.100.7").await, SpfResult::None);

    // And the engine makes no identity of it.
    let engine = Engine::default();
    let facts = IdentityFacts {
        spf: Some(SpfFact {
            domain: "open.test".into(),
            result: SpfResult::PassAny,
        }),
        ..IdentityFacts::default()
    };
    let ip = "198.51.100.7".parse().unwrap();
    let (key, why) = engine.identified_key(ip, "a@open.test", "b@rcpt.test", Some(&facts));
    assert_eq!(key.client, "198.51.100.0/24");
    assert!(why.reason.contains("passes any address"), "{}", why.reason);
}

#[tokio::test]
async fn list_answers_and_error_codes() {
    let addr = table_server(Duration::ZERO, records).await;
    let mut s = settings(addr, 2000);
    s.dnswl_zones = vec!["wl.test".into()];
    let (g, _) = gatherer(&s);
    let lists = |ip: &'static str| {
        let g = &g;
        async move {
            g.gather(&Ask {
                spf: false,
                name: false,
                ..ask(ip, "a@pool.test")
            })
            .await
        }
    };
    // 127.255.255.254 from the block list is an error code: not listed, not clean.
    let got = lists("198.51.100.7").await;
    assert!(!got.facts.dnsbl.listed() && !got.facts.dnsbl.complete);
    assert_eq!(got.facts.dnswl.hits, vec!["wl.test".to_string()]);
    let got = lists("203.0.113.9").await;
    assert_eq!(got.facts.dnsbl.hits, vec!["bl.test".to_string()]);
    assert!(got.facts.dnswl.clean());
    // NXDOMAIN everywhere: clean.
    let got = lists("192.0.2.1").await;
    assert!(got.facts.dnsbl.clean() && got.facts.dnswl.clean());
    assert!(got.trouble.is_empty());
}

#[tokio::test]
async fn lookups_beyond_the_in_flight_cap_are_not_started() {
    let server = silent_server().await;
    let s = settings(server.local_addr().unwrap(), 200);
    let (g, stats) = gatherer(&s);
    // Every slot taken, as by thousands of requests while DNS is down.
    let held = g
        .in_flight
        .clone()
        .try_acquire_many_owned(u32::try_from(MAX_IN_FLIGHT).unwrap())
        .unwrap();
    let got = g.gather(&ask("198.51.100.8", "a@pool.test")).await;
    assert!(
        got.elapsed < Duration::from_millis(100),
        "{:?}",
        got.elapsed
    );
    assert_eq!(stats.lookups.get(), 0, "nothing started");
    assert!(stats.failures.get() >= 3);
    let note = got.note().unwrap();
    assert!(note.contains("lookups already in flight"), "{note}");
    assert!(!got.facts.dnsbl.complete && !got.facts.dnsbl.listed());
    // With slots free again, lookups start.
    drop(held);
    let again = g.gather(&ask("198.51.100.8", "a@pool.test")).await;
    assert_eq!(stats.lookups.get(), 3);
    assert!(again.timed_out);
}

#[tokio::test]
async fn without_ptr_lookup_the_host_name_is_only_the_mtas() {
    let server = silent_server().await;
    let mut s = settings(server.local_addr().unwrap(), 200);
    s.ptr_lookup = false;
    s.dnsbl_zones.clear();
    let (g, stats) = gatherer(&s);
    // No name from the front end, null sender: nothing to ask.
    let got = g.gather(&ask("192.0.2.7", "<>")).await;
    assert_eq!(got.facts.name, HostName::Unknown);
    assert!(got.trouble.is_empty(), "{:?}", got.trouble);
    assert!(got.elapsed < Duration::from_millis(50), "{:?}", got.elapsed);
    assert_eq!(stats.lookups.get(), 0);
    // A name the MTA verified is still used.
    let got = g
        .gather(&Ask {
            client_name: "mta7.example.net",
            ..ask("192.0.2.7", "<>")
        })
        .await;
    assert_eq!(
        got.facts.name,
        HostName::Verified("mta7.example.net".into())
    );
}

/// Answers from `records` while `answering` is set, and drops every query otherwise.
async fn switchable_server(answering: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if !answering.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let _ = sock.send_to(&answer(&q, records), peer).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_resolver_that_stops_answering_is_not_waited_on_until_it_answers_again() {
    let answering = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = switchable_server(answering.clone()).await;
    let mut s = settings(addr, 150);
    s.dnsbl_zones.clear();
    let (g, stats) = gatherer(&s);
    // Every request waits the budget until the breaker opens...
    for i in 0..breaker::OPEN_AFTER {
        let got = g
            .gather(&ask(&format!("198.51.100.{i}"), "a@pool.test"))
            .await;
        assert!(got.timed_out && got.elapsed >= Duration::from_millis(150));
    }
    assert!(g.resolver_down_for().is_some());
    assert_eq!(stats.resolver_down.load(Ordering::Relaxed), 1);
    assert_eq!(stats.breaker_opened.get(), 1);
    // ... and then none does: the facts say "not known", as a timeout would.
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(600) {
        let got = g
            .gather(&ask(&format!("203.0.113.{n}"), "a@pool.test"))
            .await;
        assert!(got.elapsed < Duration::from_millis(20), "{:?}", got.elapsed);
        assert_eq!(got.facts.spf.as_ref().unwrap().result, SpfResult::Timeout);
        assert_eq!(got.facts.name, HostName::Timeout);
        let note = got.note().unwrap();
        assert!(
            note.starts_with(
                "DNS resolver not answering for 0 s (breaker open), not asked: spf, host name"
            ),
            "{note}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stats.skipped.get() >= 2 * n);
    // Probes went out in the background (200 ms after opening, then 400 ms after that).
    assert!(stats.lookups.get() > u64::from(2 * breaker::OPEN_AFTER));
    assert!(g.resolver_down_for().is_some());

    // The resolver answers again: the next probe (at most 2 s away) closes the breaker,
    // and requests get their facts.
    answering.store(true, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + breaker::MAX_BACKOFF * 3;
    let mut k = 0;
    while g.resolver_down_for().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        g.gather(&ask(&format!("192.0.2.{k}"), "a@pool.test")).await;
        k = (k + 1) % 250;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.resolver_down.load(Ordering::Relaxed), 0);
    let got = g.gather(&ask("198.51.100.77", "a@pool.test")).await;
    assert_eq!(got.facts.spf.as_ref().unwrap().result, SpfResult::Pass);
    assert!(got.note().is_none(), "{:?}", got.note());
}

#[tokio::test]
async fn facts_without_waiting_come_from_the_cache_or_an_open_breaker() {
    let addr = table_server(Duration::ZERO, records).await;
    let mut s = settings(addr, 2000);
    s.dnsbl_zones.clear();
    s.ptr_lookup = false;
    let (g, stats) = gatherer(&s);
    let engine = Engine::default();
    let req = Request {
        stage: "RCPT".into(),
        client_ip: Some("198.51.100.7".parse().unwrap()),
        client_name: "unknown".into(),
        sender: "a@pool.test".into(),
        recipient: "b@rcpt.test".into(),
        ..Request::default()
    };
    // Nothing cached: lookups are needed, and none was started.
    assert_eq!(g.facts_now(&engine, &req, 0).err(), Some(NeedsLookups));
    assert_eq!(stats.lookups.get(), 0);
    let (_, waited) = g.facts_for(&engine, &req, 0).await.expect("gathered");
    // Now cached: the same facts without waiting.
    let Ok(FactsNow::Gathered(now, _)) = g.facts_now(&engine, &req, 0) else {
        panic!("cached facts expected");
    };
    assert_eq!(now.facts, waited.facts);
    assert_eq!(now.facts.spf.unwrap().result, SpfResult::Pass);
    // An authenticated client needs no facts at all.
    let authenticated = Request {
        sasl_username: "alice".into(),
        ..req.clone()
    };
    assert!(matches!(
        g.facts_now(&engine, &authenticated, 0),
        Ok(FactsNow::NotNeeded(Some(Classified::Decided(_))))
    ));
    // With the breaker open, an uncached request is answered at once, without facts.
    for _ in 0..breaker::OPEN_AFTER {
        g.breaker.gathered(false, true);
    }
    let other = Request {
        client_ip: Some("203.0.113.9".parse().unwrap()),
        ..req.clone()
    };
    let Ok(FactsNow::Gathered(open, _)) = g.facts_now(&engine, &other, 0) else {
        panic!("facts without lookups expected while the breaker is open");
    };
    assert_eq!(open.facts.spf.unwrap().result, SpfResult::Timeout);
    assert!(open.resolver_down.is_some());
}

#[tokio::test]
async fn a_domain_without_spf_needs_no_lookup_for_its_next_sender() {
    let addr = table_server(Duration::ZERO, records).await;
    let mut s = settings(addr, 2000);
    s.dnsbl_zones.clear();
    s.ptr_lookup = false;
    let (g, stats) = gatherer(&s);
    let engine = Engine::default();
    let first = Request {
        stage: "RCPT".into(),
        client_ip: Some("198.51.100.7".parse().unwrap()),
        client_name: "unknown".into(),
        sender: "a@no-spf.test".into(),
        recipient: "b@rcpt.test".into(),
        ..Request::default()
    };
    let (_, gathered) = g.facts_for(&engine, &first, 0).await.expect("gathered");
    assert_eq!(gathered.facts.spf.unwrap().result, SpfResult::None);
    // Kept once, for the domain: no answer per sender and address beside it (a busy MX's
    // cache would fill with them).
    assert_eq!((g.no_spf.len(), g.cache.len()), (1, 0));
    let asked = stats.lookups.get();
    // Another sender of that domain, from another address: `none` at once, no lookup.
    let next = Request {
        client_ip: Some("203.0.113.80".parse().unwrap()),
        sender: "Other@No-SPF.test".into(),
        ..first.clone()
    };
    let Ok(FactsNow::Gathered(now, unkeyed)) = g.facts_now(&engine, &next, 0) else {
        panic!("a domain known to have no SPF record needs no lookup");
    };
    assert_eq!(stats.lookups.get(), asked);
    assert_eq!(now.facts.spf.as_ref().unwrap().result, SpfResult::None);
    // Finishing the classification with the facts is classifying the request with them.
    let with = Request {
        facts: Some(now.facts),
        ..next
    };
    assert_eq!(
        engine.classify_keyed(unkeyed, &with),
        engine.classify(&with, 0)
    );
    // A domain that publishes SPF is still checked per address.
    let pool = Request {
        sender: "a@pool.test".into(),
        ..first
    };
    assert_eq!(g.facts_now(&engine, &pool, 0).err(), Some(NeedsLookups));
}
