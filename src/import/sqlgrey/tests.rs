use proptest::prelude::*;

use super::*;

fn t(s: &str) -> Cell {
    Cell::Text(s.as_bytes().to_vec())
}

#[test]
fn sources_are_whole_addresses_class_c_or_ipv6_64() {
    let net = |s: &str| parse_src(s).map(|n| (n.ip.to_string(), n.prefix));
    assert_eq!(net("192.0.2.7"), Some(("192.0.2.7".into(), 32)));
    assert_eq!(net("192.0.2"), Some(("192.0.2.0".into(), 24)));
    assert_eq!(net(" 10.1.2 "), Some(("10.1.2.0".into(), 24)));
    assert_eq!(
        net("2001:0db8:0000:0000:0000:0000:0000:0025"),
        Some(("2001:db8::25".into(), 128))
    );
    assert_eq!(net("2001:db8::25"), Some(("2001:db8::25".into(), 128)));
    assert_eq!(
        net("2001:0db8:0001:0002"),
        Some(("2001:db8:1:2::".into(), 64))
    );
    for bad in [
        "",
        "192.0",
        "192.0.2.",
        "256.0.2",
        "1.2.3.4.5",
        "a.b.c",
        "2001:db8",
        "2001:db8:1:2:3",
        "mail.example.net",
        "192.0.2.0/24",
    ] {
        assert_eq!(parse_src(bad), None, "{bad}");
    }
}

#[test]
fn times_in_every_shape_sqlgrey_leaves() {
    assert_eq!(
        time_of(Some(&Cell::Int(1_796_403_787)), "t"),
        Ok(1_796_403_787)
    );
    assert_eq!(
        time_of(Some(&Cell::Real(1_796_403_787.9)), "t"),
        Ok(1_796_403_787)
    );
    assert_eq!(time_of(Some(&t("1796403787")), "t"), Ok(1_796_403_787));
    assert_eq!(
        time_of(Some(&t("2026-12-04 17:03:07")), "t"),
        Ok(1_796_403_787)
    );
    for bad in [
        Cell::Null,
        Cell::Int(-1),
        Cell::Real(f64::NAN),
        Cell::Real(f64::INFINITY),
        Cell::Real(-3.0),
        t("yesterday"),
        Cell::Text(vec![0xff]),
    ] {
        assert!(time_of(Some(&bad), "t").is_err(), "{bad:?}");
    }
    assert!(time_of(None, "t").is_err());
}

#[test]
fn connect_rows_give_the_sender_back() {
    let row = |name: &str, domain: &str| {
        parse_connect(&[
            t(name),
            t(domain),
            t("192.0.2"),
            t("bob+x@example.org"),
            Cell::Int(5),
        ])
    };
    let r = row("alice", "example.net").unwrap();
    assert_eq!(r.sender, "alice@example.net");
    assert_eq!(r.recipient, "bob+x@example.org");
    assert_eq!(r.first_seen, 5);
    assert_eq!(r.net.prefix, 24);
    assert_eq!(row("-undef-", "-undef-").unwrap().sender, "");
    assert_eq!(
        row("mailer-daemon", "-undef-").unwrap().sender,
        "mailer-daemon"
    );
    assert!(parse_connect(&[t("a"), t("b"), t("192.0.2")]).is_err());
    assert!(parse_connect(&[t("a"), t("b"), t("x"), t("r@d"), Cell::Int(1)]).is_err());
    assert!(parse_connect(&[t("a"), t("b"), t("192.0.2"), t(""), Cell::Int(1)]).is_err());
    assert!(parse_connect(&[t("a"), Cell::Int(3), t("192.0.2"), t("r@d"), Cell::Int(1)]).is_err());
    let r = parse_awl(
        &[t("2001:0db8:0001:0002"), Cell::Real(7.0), t("example.net")],
        false,
    )
    .unwrap();
    assert_eq!((r.net.prefix, r.last_seen, r.sender_name), (64, 7, None));
    let r = parse_awl(
        &[t("192.0.2"), Cell::Int(7), t("example.net"), t("alice")],
        true,
    )
    .unwrap();
    assert_eq!(r.sender_name.as_deref(), Some("alice"));
    assert!(parse_awl(&[t("192.0.2"), Cell::Null, t("d")], false).is_err());
    assert!(parse_awl(&[t("192.0.2"), Cell::Int(1), t("d")], true).is_err());
}

#[test]
fn allow_lists_cover_connect_rows_as_sqlgrey_matches_them() {
    let awl = |src: &str, domain: &str, name: Option<&str>, seen| {
        let mut cells = vec![t(src), Cell::Int(seen), t(domain)];
        cells.extend(name.map(t));
        parse_awl(&cells, name.is_some()).unwrap()
    };
    let conn = |src: &str, name: &str, domain: &str| {
        parse_connect(&[t(name), t(domain), t(src), t("r@d"), Cell::Int(1)]).unwrap()
    };
    let mut lists = AllowLists::default();
    assert!(lists.add(&awl("192.0.2", "example.net", Some("alice"), 50)));
    assert!(lists.add(&awl("192.0.2", "example.net", Some("alice"), 40)));
    assert!(lists.add(&awl("198.51.100.9", "bulk.example", None, 60)));
    assert_eq!(
        lists.covers(&conn("192.0.2", "alice+news", "example.net")),
        Some(50)
    );
    assert_eq!(
        lists.covers(&conn("192.0.2", "alice", "example.net")),
        Some(50)
    );
    assert_eq!(
        lists.covers(&conn("192.0.2.7", "alice", "example.net")),
        None,
        "src must match"
    );
    assert_eq!(lists.covers(&conn("192.0.2", "bob", "example.net")), None);
    assert_eq!(
        lists.covers(&conn("198.51.100.9", "anyone", "bulk.example")),
        Some(60)
    );
    assert_eq!(
        lists.covers(&conn("198.51.100.9", "-undef-", "-undef-")),
        None
    );
}

#[test]
fn urls_name_the_database() {
    assert_eq!(
        Source::parse("postgres://sqlgrey:pw@db/sqlgrey"),
        Ok(Source::Postgres("postgres://sqlgrey:pw@db/sqlgrey".into()))
    );
    assert!(matches!(
        Source::parse("postgresql://h/d"),
        Ok(Source::Postgres(_))
    ));
    assert_eq!(
        Source::parse("sqlite:/var/lib/sqlgrey/sqlgrey.db"),
        Ok(Source::Sqlite("/var/lib/sqlgrey/sqlgrey.db".into()))
    );
    assert_eq!(
        Source::parse("sqlite:///var/lib/sqlgrey/sqlgrey.db"),
        Ok(Source::Sqlite("/var/lib/sqlgrey/sqlgrey.db".into()))
    );
    assert_eq!(
        Source::parse("sqlite:rel.db"),
        Ok(Source::Sqlite("rel.db".into()))
    );
    let mysql = Source::parse("mysql://u@h/sqlgrey").unwrap_err();
    assert!(mysql.contains("not supported"), "{mysql}");
    assert!(Source::parse("sqlite:").is_err());
    assert!(Source::parse("redis://h").is_err());
    assert!(Source::parse("/no/such/file.db").is_err());
    assert_eq!(
        Source::parse("postgres://sqlgrey:secret@db/sqlgrey")
            .unwrap()
            .shown(),
        "postgres://sqlgrey:***@db/sqlgrey"
    );
}

fn cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        Just(Cell::Null),
        any::<i64>().prop_map(Cell::Int),
        any::<f64>().prop_map(Cell::Real),
        "[0-9a-f:.@ -]{0,40}".prop_map(|s| Cell::Text(s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Cell::Text),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any row of any shape is read or refused, never a panic.
    #[test]
    fn any_row_parses_without_panic(cells in proptest::collection::vec(cell(), 0..7)) {
        let _ = parse_connect(&cells);
        let _ = parse_awl(&cells, true);
        let _ = parse_awl(&cells, false);
        if let Some(Cell::Text(t)) = cells.first() {
            let _ = parse_src(&String::from_utf8_lossy(t));
        }
    }
}
