use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::engine::Policy;
use crate::store::MemoryStore;

const NOW: u64 = 10_000_000;

fn engine() -> Engine {
    Engine::default()
}

fn net(s: &str, prefix: u8) -> SourceNet {
    SourceNet {
        ip: s.parse().unwrap(),
        prefix,
    }
}

#[test]
fn groups_take_source_networks_no_wider_than_greygates() {
    let e = engine();
    assert_eq!(group_of(&e, net("192.0.2.0", 24)).unwrap(), "192.0.2.0/24");
    assert_eq!(group_of(&e, net("192.0.2.7", 32)).unwrap(), "192.0.2.0/24");
    assert_eq!(
        group_of(&e, net("::ffff:192.0.2.7", 128)).unwrap(),
        "192.0.2.0/24"
    );
    assert_eq!(
        group_of(&e, net("2001:db8:1:2::", 64)).unwrap(),
        "2001:db8:1:2::/64"
    );
    assert_eq!(
        group_of(&e, net("192.0.0.0", 16)).map_err(|b| b.skip),
        Err(Skip::WiderNetwork)
    );
    let hosts = Engine::new(
        Policy {
            ipv4_prefix: 32,
            ..Policy::default()
        },
        Default::default(),
    );
    assert_eq!(
        group_of(&hosts, net("192.0.2.0", 24)).map_err(|b| b.skip),
        Err(Skip::WiderNetwork)
    );
    assert_eq!(group_of(&hosts, net("192.0.2.7", 32)).unwrap(), "192.0.2.7");
}

#[test]
fn keys_are_normalised_the_greygate_way() {
    let k = key_of(
        &engine(),
        net("192.0.2.0", 24),
        "prvs=1234567890=Alice+News@Example.NET",
        "Bob+x@Example.org",
    )
    .unwrap();
    assert_eq!(k.client, "192.0.2.0/24");
    assert_eq!(k.sender, "alice@example.net");
    assert_eq!(k.recipient, "bob@example.org");
    assert_eq!(
        key_of(&engine(), net("192.0.2.0", 24), "", "b@d")
            .unwrap()
            .sender,
        "<>"
    );
}

#[test]
fn merges_keep_the_newer_knowledge() {
    let e = engine();
    let p = e.policy.clone();
    let pend = |first| pending(&e, first, first);
    let pass = |first, last| passed(&e, first, last);
    // Nothing, or a dead record: the import's.
    assert_eq!(
        merge_triplet(&e, None, &pend(NOW - 60), NOW),
        (Merge::New, Some(pend(NOW - 60)))
    );
    let dead = pend(NOW - p.retry_window - 1);
    assert_eq!(
        merge_triplet(&e, Some(&dead), &pend(NOW), NOW).0,
        Merge::New
    );
    // greygate passed it: a pending source round adds nothing.
    assert_eq!(
        merge_triplet(&e, Some(&pass(NOW - 900, NOW - 100)), &pend(NOW - 60), NOW),
        (Merge::Kept, None)
    );
    // The source passed what greygate holds pending.
    let (m, w) = merge_triplet(&e, Some(&pend(NOW - 60)), &pass(NOW - 900, NOW - 500), NOW);
    assert_eq!(m, Merge::Into);
    let w = w.unwrap();
    assert!(w.passed && e.triplet_alive(&w, NOW));
    assert_eq!((w.first_seen, w.last_seen), (NOW - 900, NOW - 60));
    // Both passed: the later sighting wins.
    assert_eq!(
        merge_triplet(
            &e,
            Some(&pass(NOW - 900, NOW - 100)),
            &pass(NOW - 900, NOW - 500),
            NOW
        ),
        (Merge::Kept, None)
    );
    let (m, w) = merge_triplet(
        &e,
        Some(&pass(NOW - 900, NOW - 500)),
        &pass(NOW - 800, NOW - 100),
        NOW,
    );
    assert_eq!(m, Merge::Into);
    assert_eq!(w.unwrap().last_seen, NOW - 100);
    // Both pending: the earlier first sighting.
    let (m, w) = merge_triplet(&e, Some(&pend(NOW - 60)), &pend(NOW - 600), NOW);
    assert_eq!(m, Merge::Into);
    assert_eq!(w.unwrap().first_seen, NOW - 600);
    assert_eq!(
        merge_triplet(&e, Some(&pend(NOW - 600)), &pend(NOW - 60), NOW),
        (Merge::Kept, None)
    );
    // The same record again: kept (an import may run twice).
    let r = pass(NOW - 900, NOW - 100);
    assert_eq!(merge_triplet(&e, Some(&r), &r, NOW), (Merge::Kept, None));
}

#[test]
fn client_merges_take_the_larger_count_never_a_sum() {
    let e = engine();
    let rec = |passes, seen: u64| ClientRecord {
        passes,
        last_counted: seen,
        last_seen: seen,
        expires_at: seen + e.policy.auto_allow_lifetime,
    };
    assert_eq!(merge_client(&e, None, &rec(3, NOW), NOW).0, Merge::New);
    let (m, w) = merge_client(&e, Some(&rec(2, NOW)), &rec(7, NOW - 50), NOW);
    assert_eq!(m, Merge::Into);
    assert_eq!((w.unwrap().passes, w.unwrap().last_seen), (7, NOW));
    assert_eq!(
        merge_client(&e, Some(&rec(7, NOW)), &rec(7, NOW), NOW),
        (Merge::Kept, None)
    );
    assert_eq!(
        merge_client(&e, Some(&rec(9, NOW)), &rec(2, NOW - 5), NOW),
        (Merge::Kept, None)
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One import into a memory store: what it wrote, what it kept and skipped, and that a
/// dry run (overlay, no store) reports the same.
#[test]
fn an_import_merges_counts_and_skips() {
    let e = engine();
    let feed = |mut imp: Importer| {
        let rt = rt();
        let t = imp.table("t");
        let c = imp.table("c");
        let key = |r: &str| key_of(imp.engine(), net("192.0.2.0", 24), "a@b", r).unwrap();
        let (k1, k2, k3) = (key("r1@d"), key("r2@d"), key("R2+x@d"));
        let p = imp.engine().policy.clone();
        let pass = passed(imp.engine(), NOW - 900, NOW - 100);
        let pend = pending(imp.engine(), NOW - 60, NOW - 60);
        let old = pending(
            imp.engine(),
            NOW - p.retry_window - 5,
            NOW - p.retry_window - 5,
        );
        for (k, r) in [(k1, pass), (k2, pend), (k3, pend), (key("r4@d"), old)] {
            imp.read(t);
            rt.block_on(imp.triplet(t, k, r)).unwrap();
        }
        imp.read(t);
        imp.skip(t, Bad::unparseable("no '/'"), || "record 5".into());
        for ip in ["192.0.2.7", "192.0.2.8"] {
            imp.read(c);
            let g = group_of(imp.engine(), net(ip, 32)).unwrap();
            imp.client_passes(c, g, 6, NOW - 10).unwrap();
        }
        imp.read(c);
        imp.client_passes(
            c,
            "198.51.100.0/24".into(),
            2,
            NOW - p.auto_allow_lifetime - 1,
        )
        .unwrap();
        rt.block_on(imp.finish(|n| n)).unwrap()
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let r = feed(Importer::new(
        e.clone(),
        Some(store.clone()),
        false,
        NOW,
        "s".into(),
        "m".into(),
    ));
    assert_eq!(r.read(), 8);
    assert_eq!(
        (r.triplets.new, r.triplets.into_existing, r.triplets.passed),
        (2, 0, 1)
    );
    assert_eq!(
        r.skipped(Skip::ExistingNewer),
        1,
        "r2+x is r2 in greygate's key"
    );
    assert_eq!(r.skipped(Skip::Expired), 2);
    assert_eq!(r.skipped(Skip::Unparseable), 1);
    assert_eq!((r.clients.new, r.clients.auto_allowed), (1, 1));
    assert_eq!(r.tables[1].merged, 2, "two addresses, one group");
    assert!(
        r.tables[0].examples[0].contains("record 5"),
        "{:?}",
        r.tables[0].examples
    );
    let g = rt()
        .block_on(store.get_client("192.0.2.0/24"))
        .unwrap()
        .unwrap();
    assert_eq!(g.passes, 6);
    assert!(e.client_allowed(Some(&g), NOW));

    // The dry run over an empty store tells the same.
    let d = feed(Importer::new(
        e.clone(),
        None,
        true,
        NOW,
        "s".into(),
        "m".into(),
    ));
    assert_eq!(format!("{:?}", d.tables), format!("{:?}", r.tables));
    assert!(d.to_text().contains("dry run"));

    // Again into the same store: everything kept.
    let a = feed(Importer::new(
        e,
        Some(store),
        false,
        NOW,
        "s".into(),
        "m".into(),
    ));
    assert_eq!(a.merged(), 0);
    assert_eq!(a.skipped(Skip::ExistingNewer), 5);
    let text = a.to_text();
    assert!(text.contains("existing-newer"), "{text}");
}

#[test]
fn auto_allow_off_skips_client_counts() {
    let e = Engine::new(
        Policy {
            auto_allow_after: 0,
            ..Policy::default()
        },
        Default::default(),
    );
    let mut imp = Importer::new(e, None, true, NOW, "s".into(), "m".into());
    let c = imp.table("c");
    imp.read(c);
    imp.client_passes(c, "192.0.2.0/24".into(), 9, NOW).unwrap();
    let r = rt().block_on(imp.finish(|n| n)).unwrap();
    assert_eq!(r.skipped(Skip::AutoAllowOff), 1);
    assert_eq!(r.clients.new, 0);
}

/// Into a store of hashed addresses, imported triplets are keyed as the daemon keys them:
/// digests of the normalised addresses, never the text.
#[test]
fn imports_into_a_hashed_store_write_digests() {
    let e = engine().with_addresses(crate::engine::AddressKeys::hashed(
        b"import-secret-0123456789",
    ));
    let net = SourceNet {
        ip: "192.0.2.9".parse().unwrap(),
        prefix: 32,
    };
    let k = key_of(&e, net, "Alice+tag@Example.NET", "bob@example.org").unwrap();
    assert_eq!(k, e.key(net.ip, "alice@example.net", "BOB@example.org"));
    assert!(
        k.sender.starts_with("h:") && k.recipient.starts_with("h:"),
        "{k}"
    );
    assert!(!k.joined().contains('@'), "{k}");
}

fn triplet() -> impl Strategy<Value = Triplet> {
    // Times over the last 40 days: live and dead records of both kinds.
    (NOW - 3_500_000..=NOW, 0..3_500_000u64, any::<bool>()).prop_map(|(first, gap, p)| {
        let e = engine();
        let gap = gap.min(NOW - first);
        if p {
            passed(&e, first, first + gap)
        } else {
            pending(&e, first, first + gap)
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A merge never loses a pass, never moves a first sighting later, never writes a dead
    /// record, and merging the result again changes nothing (imports are idempotent).
    #[test]
    fn merges_are_monotone_and_idempotent(old in proptest::option::of(triplet()), new in triplet()) {
        let e = engine();
        prop_assume!(e.triplet_alive(&new, NOW));
        let (_, w) = merge_triplet(&e, old.as_ref(), &new, NOW);
        let after = w.or(old).expect("something is stored");
        prop_assert!(e.triplet_alive(&after, NOW));
        if new.passed || old.is_some_and(|o| o.passed && e.triplet_alive(&o, NOW)) {
            prop_assert!(after.passed);
        }
        if !after.passed && !new.passed {
            prop_assert!(after.first_seen <= new.first_seen);
        }
        prop_assert_eq!(merge_triplet(&e, Some(&after), &new, NOW), (Merge::Kept, None));
    }
}
