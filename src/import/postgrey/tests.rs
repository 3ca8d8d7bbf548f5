use proptest::prelude::*;

use super::*;

/// `db5.3_dump -p -h DBDIR postgrey.db` of a real postgrey 1.37 database (keys as it wrote
/// them: a sender with a backslash, an upper-case Ü it left as it was, the null sender to
/// a recipient holding '/').
const REAL_DUMP: &str = "VERSION=3
format=print
type=btree
db_pagesize=4096
HEADER=END
 192.0.2.0/a b\\\\\\\\c@ex/\\c3\\9c@example.org
 1796403787,1796403787
 192.0.2.0/alice@example.net/bob+x@example.org
 1796396687,1796397887
 2001:db8:0:0:0:0:0:0//x/y@example.org
 1796403787,1796403787
DATA=END
";

fn pairs(dump: &str) -> Result<Vec<DumpItem>, DumpError> {
    let mut out = Vec::new();
    parse_dump(dump.as_bytes(), |item| {
        out.push(item);
        Ok::<_, DumpError>(())
    })?;
    Ok(out)
}

#[test]
fn reads_a_real_dump() {
    let items = pairs(REAL_DUMP).unwrap();
    assert_eq!(
        items,
        vec![
            DumpItem::Pair(
                b"192.0.2.0/a b\\\\c@ex/\xc3\x9c@example.org".to_vec(),
                b"1796403787,1796403787".to_vec()
            ),
            DumpItem::Pair(
                b"192.0.2.0/alice@example.net/bob+x@example.org".to_vec(),
                b"1796396687,1796397887".to_vec()
            ),
            DumpItem::Pair(
                b"2001:db8:0:0:0:0:0:0//x/y@example.org".to_vec(),
                b"1796403787,1796403787".to_vec()
            ),
        ]
    );
    let opts = PostgreyOptions::default();
    let DumpItem::Pair(k, v) = &items[2] else {
        unreachable!()
    };
    let t = parse_triplet(k, v, &opts).unwrap();
    assert_eq!(t.sender, "");
    assert_eq!(t.recipient, "x/y@example.org");
    assert_eq!(
        t.net,
        SourceNet {
            ip: "2001:db8::".parse().unwrap(),
            prefix: 64
        }
    );
}

#[test]
fn bytevalue_dumps_and_several_sections_are_read() {
    let dump = "VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\n 6162\n 3132\nDATA=END\n\
                VERSION=3\nformat=print\nHEADER=END\n k\n v\nDATA=END\n";
    assert_eq!(
        pairs(dump).unwrap(),
        vec![
            DumpItem::Pair(b"ab".to_vec(), b"12".to_vec()),
            DumpItem::Pair(b"k".to_vec(), b"v".to_vec()),
        ]
    );
}

#[test]
fn broken_records_are_items_and_broken_dumps_errors() {
    let dump =
        "format=print\nHEADER=END\n bad\\zz\n 1,2\n k\nnot data\n ok\n 1,2\n odd\nDATA=END\n";
    let items = pairs(dump).unwrap();
    assert!(
        matches!(&items[0], DumpItem::Bad(e) if e.contains("key")),
        "{items:?}"
    );
    assert!(
        matches!(&items[1], DumpItem::Bad(e) if e.contains("value")),
        "{items:?}"
    );
    assert_eq!(items[2], DumpItem::Pair(b"ok".to_vec(), b"1,2".to_vec()));
    assert!(matches!(&items[3], DumpItem::Bad(e) if e.contains("without a value")));
    assert_eq!(pairs(""), Err(DumpError::NoHeader));
    assert_eq!(pairs("db_dump: no such file\n"), Err(DumpError::NoHeader));
    assert_eq!(
        pairs("format=print\nHEADER=END\n a\n b\n"),
        Err(DumpError::Truncated)
    );
    assert!(matches!(
        pairs("format=weird\nHEADER=END\nDATA=END\n"),
        Err(DumpError::Format(_))
    ));
}

#[test]
fn an_over_long_line_is_one_bad_record() {
    let long = "x".repeat(MAX_LINE + 10);
    let dump = format!("format=print\nHEADER=END\n {long}\n 1,2\n k\n 1,2\nDATA=END\n");
    let items = pairs(&dump).unwrap();
    assert!(
        matches!(&items[0], DumpItem::Bad(e) if e.contains("longer")),
        "{items:?}"
    );
    assert_eq!(items[1], DumpItem::Pair(b"k".to_vec(), b"1,2".to_vec()));
}

#[test]
fn keys_split_where_only_one_reading_fits() {
    fn ok(k: &str) -> (&str, &str, &str) {
        split_key(k).unwrap()
    }
    assert_eq!(ok("192.0.2.0/a@b/c@d"), ("192.0.2.0", "a@b", "c@d"));
    assert_eq!(ok("192.0.2.0//c@d"), ("192.0.2.0", "", "c@d"));
    assert_eq!(ok("192.0.2.0/a/b@c/d/e@f"), ("192.0.2.0", "a/b@c", "d/e@f"));
    // A sender without a domain (postgrey keeps it as it came).
    assert_eq!(
        split_key("192.0.2.0/mailer-daemon/c@d").map_err(|b| b.skip),
        Err(Skip::Unparseable)
    );
    for bad in [
        "",
        "192.0.2.0",
        "192.0.2.0/a@b",
        "192.0.2.0/a@b/c",
        "x/a@b/c@d/e@f",
    ] {
        assert!(split_key(bad).is_err(), "{bad}");
    }
}

#[test]
fn records_read_and_refused() {
    let o = PostgreyOptions::default();
    let t = parse_triplet(b"192.0.2.0/a@b/c@d", b"10,20,host.example", &o).unwrap();
    assert_eq!((t.first, t.last), (10, 20));
    assert_eq!(t.net.prefix, 24);
    // Host bits set: a host key (--lookup-by-host, or a narrower cidr back then).
    assert_eq!(
        parse_triplet(b"192.0.2.7/a@b/c@d", b"1,2", &o)
            .unwrap()
            .net
            .prefix,
        32
    );
    let by_host = PostgreyOptions {
        lookup_by_host: true,
        ..o
    };
    assert_eq!(
        parse_triplet(b"192.0.2.0/a@b/c@d", b"1,2", &by_host)
            .unwrap()
            .net
            .prefix,
        32
    );
    let digest = b"0123456789abcdef0123456789abcdef01234567";
    assert_eq!(
        parse_triplet(digest, b"1,2", &o).map_err(|b| b.skip),
        Err(Skip::Hashed)
    );
    assert_eq!(
        parse_client(digest, b"1,2").map_err(|b| b.skip),
        Err(Skip::Hashed)
    );
    for (k, v) in [
        (&b"nonsense/a@b/c@d"[..], &b"1,2"[..]),
        (b"192.0.2.0/a@b/c@d", b"1"),
        (b"192.0.2.0/a@b/c@d", b"x,2"),
        (b"192.0.2.0/a@b/c@d", b"-1,2"),
        (b"192.0.2.0/a@\xff/c@d", b"1,2"),
    ] {
        assert_eq!(
            parse_triplet(k, v, &o).map_err(|b| b.skip),
            Err(Skip::Unparseable),
            "{k:?} {v:?}"
        );
    }
    let c = parse_client(b"2001:db8::25", b"7,99").unwrap();
    assert_eq!((c.count, c.last), (7, 99));
    assert_eq!(
        parse_client(b"192.0.2.7", b"99999999999,1").unwrap().count,
        u32::MAX
    );
    assert!(parse_client(b"192.0.2", b"1,2").is_err());
}

#[test]
fn client_counts_keep_each_sides_verdict() {
    let o = PostgreyOptions::default(); // postgrey whitelists from 5 passes
    assert_eq!(client_count(5, &o, 5), 5);
    assert_eq!(client_count(9, &o, 5), 9);
    assert_eq!(client_count(5, &o, 10), 10, "whitelisted stays allowed");
    assert_eq!(client_count(4, &o, 3), 2, "not whitelisted stays below");
    assert_eq!(client_count(4, &o, 10), 4);
    let off = PostgreyOptions {
        auto_whitelist_clients: 0,
        ..o
    };
    assert_eq!(client_count(50, &off, 5), 4);
}

/// A `db_dump` that writes a header and then hangs (as on a lock a crashed postgrey left)
/// is stopped once it makes no progress for the stall limit; one that fails says so.
#[test]
fn a_stalled_or_failing_db_dump_is_an_error_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    std::fs::write(
        &hang,
        "#!/bin/sh\nprintf 'format=print\\nHEADER=END\\n k\\n 1,2\\n'\nexec sleep 600\n",
    )
    .unwrap();
    let fail = dir.path().join("fail");
    std::fs::write(
        &fail,
        "#!/bin/sh\necho 'db_dump: no such file' >&2\nexit 1\n",
    )
    .unwrap();
    for p in [&hang, &fail] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let e = dump_file(&hang, dir.path(), "x.db", Duration::from_secs(1), |item| {
        got.push(item);
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("wrote nothing for 1 s"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got, vec![DumpItem::Pair(b"k".to_vec(), b"1,2".to_vec())]);
    let e = dump_file(&fail, dir.path(), "x.db", STALL, |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
}

/// The inverse of [`unescape`], as db_dump writes it.
fn escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(format!("\\{b:02x}").as_bytes()),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn escapes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(unescape(&escape(&bytes)).unwrap(), bytes);
    }

    /// Any input: records or errors, never a panic; every record parser accepts anything.
    #[test]
    fn any_dump_parses_without_panic(
        head in proptest::collection::vec(any::<u8>(), 0..64),
        lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..20),
        end in any::<bool>(),
    ) {
        let mut dump = b"format=print\nHEADER=END\n".to_vec();
        dump.extend_from_slice(&head);
        for l in &lines {
            dump.push(b' ');
            dump.extend_from_slice(l);
            dump.push(b'\n');
        }
        if end {
            dump.extend_from_slice(b"DATA=END\n");
        }
        let o = PostgreyOptions::default();
        let _ = parse_dump(&dump[..], |item| {
            if let DumpItem::Pair(k, v) = item {
                let _ = parse_triplet(&k, &v, &o);
                let _ = parse_client(&k, &v);
            }
            Ok::<_, DumpError>(())
        });
    }

    /// Keys made of the characters that matter (separators, '@', digits, address text).
    #[test]
    fn any_key_parses_without_panic(
        key in "[0-9a-f:./@ +#\\\\]{0,60}",
        value in "[0-9,]{0,30}",
        v4 in 0u8..=32,
        v6 in 0u8..=128,
        by_host in any::<bool>(),
    ) {
        let o = PostgreyOptions { ipv4cidr: v4, ipv6cidr: v6, lookup_by_host: by_host, ..PostgreyOptions::default() };
        if let Ok(t) = parse_triplet(key.as_bytes(), value.as_bytes(), &o) {
            prop_assert!(t.net.prefix <= 128);
        }
    }
}
