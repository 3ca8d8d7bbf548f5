//! Merging, rendering and the atomic write; the walk itself is tested against a real DNS
//! server (tests/it/lists.rs).

use super::*;

fn walked(domain: &str, nets: &[&str]) -> (String, Walked) {
    (
        domain.to_string(),
        Walked {
            ranges: nets
                .iter()
                .map(|n| Found {
                    net: n.parse().unwrap(),
                    record: format!("_spf.{domain}"),
                })
                .collect(),
            lookups: 1,
            ..Walked::default()
        },
    )
}

fn shown(ranges: &[Range]) -> Vec<String> {
    ranges
        .iter()
        .map(|r| {
            let d: Vec<&str> = r.domains.iter().map(String::as_str).collect();
            format!("{} {}", r.net, d.join(","))
        })
        .collect()
}

#[test]
fn merge_joins_duplicates_contained_and_adjacent_ranges_keeping_their_domains() {
    let (ranges, wide) = merge(&[
        walked(
            "a.example",
            &[
                "192.0.2.0/25",
                "192.0.2.128/25",
                "198.51.100.7/32",
                "2001:db8:1::/48",
            ],
        ),
        walked(
            "b.example",
            &[
                "198.51.100.0/24",
                "192.0.2.0/24",
                "203.0.113.9/24",
                "2001:db8:1:2::/64",
                "2001:db8:2::/48",
            ],
        ),
    ]);
    assert!(wide.is_empty());
    assert_eq!(
        shown(&ranges),
        [
            "192.0.2.0/24 a.example,b.example",
            "198.51.100.0/24 a.example,b.example",
            // Host bits cleared.
            "203.0.113.0/24 b.example",
            // Contained in the /48 of a.example.
            "2001:db8:1::/48 a.example,b.example",
            "2001:db8:2::/48 b.example",
        ]
    );
}

#[test]
fn merge_takes_ipv4_mapped_ranges_as_ipv4_and_leaves_out_huge_ones() {
    let (ranges, wide) = merge(&[walked(
        "a.example",
        &[
            "::ffff:192.0.2.0/120",
            "192.0.2.7/32",
            "0.0.0.0/1",
            "10.0.0.0/8",
            "2000::/3",
            "2001:db8::/16",
        ],
    )]);
    assert_eq!(
        shown(&ranges),
        [
            "10.0.0.0/8 a.example",
            "192.0.2.0/24 a.example",
            "2001::/16 a.example"
        ]
    );
    let wide: Vec<String> = wide.iter().map(|w| w.found.net.to_string()).collect();
    assert_eq!(wide, ["0.0.0.0/1", "2000::/3"]);
}

#[test]
fn render_is_an_allow_list_file_with_the_domains_as_comments() {
    let input = [
        walked("a.example", &["192.0.2.0/24"]),
        walked("b.example", &["192.0.2.0/24", "2001:db8::/32"]),
    ];
    let (ranges, _) = merge(&input);
    let text = render(&ranges, &input, "2026-01-02T03:04:05Z");
    assert!(text.contains("at 2026-01-02T03:04:05Z"), "{text}");
    assert!(
        text.contains("# b.example: 2 ranges, 1 DNS lookups"),
        "{text}"
    );
    assert!(
        text.contains("\n192.0.2.0/24  # a.example, b.example\n"),
        "{text}"
    );
    assert!(text.contains("\n2001:db8::/32  # b.example\n"), "{text}");
    // The daemon's reader takes it, every range once.
    let mut allow = crate::engine::AllowLists::default();
    allow
        .add_file(
            Path::new("big-senders"),
            &text,
            crate::engine::AllowLists::add_client,
        )
        .unwrap();
    assert_eq!(allow.counts(), (2, 0, 0));
    let ip = "2001:db8::25".parse().unwrap();
    let (_, origin) = allow.match_client(ip, "unknown").unwrap();
    assert_eq!(origin.entry, "2001:db8::/32");

    // Many source domains: four named, the rest counted.
    let many: Vec<(String, Walked)> = (0..6)
        .map(|i| walked(&format!("d{i}.example"), &["198.51.100.0/24"]))
        .collect();
    let (ranges, _) = merge(&many);
    let text = render(&ranges, &many, "now");
    assert!(
        text.contains(
            "198.51.100.0/24  # d0.example, d1.example, d2.example, d3.example and 2 more"
        ),
        "{text}"
    );
}

#[test]
fn write_replaces_the_file_in_one_step_and_makes_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/big-senders");
    write(&path, "192.0.2.0/24\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "192.0.2.0/24\n");
    write(&path, "198.51.100.0/24\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "198.51.100.0/24\n");
    // No temporary file left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["big-senders"]);
    // A directory in the way: an error, and nothing left behind.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    assert!(write(&blocked, "x\n").is_err());
    assert!(blocked.join("x").is_dir());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
}

#[test]
fn built_in_domains_are_domain_names_each_once_with_a_comment() {
    let mut seen = std::collections::HashSet::new();
    for (d, who) in domains::BUILT_IN {
        assert!(
            record::is_domain_name(d) && *d == d.to_ascii_lowercase(),
            "{d}"
        );
        assert!(!who.is_empty(), "{d}");
        assert!(seen.insert(d), "{d} twice");
    }
}
