//! Fuzzes `greygate import`'s readers: `db_dump -p` output and postgrey's keys and values
//! (first byte even), and sqlgrey's rows (first byte odd; cells one a line, `n` NULL, `i`
//! and `r` numbers, anything else text). Any input is read or refused, never a panic, and
//! what is read maps onto greygate keys the same way.
#![no_main]

use greygate::engine::Engine;
use greygate::import::postgrey::{self, DumpError, DumpItem, PostgreyOptions};
use greygate::import::sqlgrey::{self, AllowLists, Cell};
use greygate::import::{group_of, key_of};
use libfuzzer_sys::fuzz_target;

fn cell(line: &[u8]) -> Cell {
    let number = |b: &[u8]| std::str::from_utf8(b).ok().map(str::trim).map(str::to_string);
    match line.split_first() {
        Some((b'n', _)) => Cell::Null,
        Some((b'i', rest)) => number(rest)
            .and_then(|s| s.parse().ok())
            .map_or(Cell::Null, Cell::Int),
        Some((b'r', rest)) => number(rest)
            .and_then(|s| s.parse().ok())
            .map_or(Cell::Null, Cell::Real),
        _ => Cell::Text(line.to_vec()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let engine = Engine::default();
    if mode % 2 == 0 {
        let opts = PostgreyOptions {
            ipv4cidr: mode % 33,
            ipv6cidr: mode.wrapping_mul(7) % 129,
            lookup_by_host: mode & 0x80 != 0,
            ..PostgreyOptions::default()
        };
        let _ = postgrey::parse_dump(rest, |item| {
            if let DumpItem::Pair(k, v) = item {
                if let Ok(t) = postgrey::parse_triplet(&k, &v, &opts)
                    && let Ok(key) = key_of(&engine, t.net, &t.sender, &t.recipient)
                {
                    assert!(!key.client.is_empty() && !key.sender.is_empty());
                }
                if let Ok(c) = postgrey::parse_client(&k, &v) {
                    let full = if c.ip.is_ipv4() { 32 } else { 128 };
                    let net = greygate::import::SourceNet { ip: c.ip, prefix: full };
                    assert!(group_of(&engine, net).is_ok(), "a host is in one group");
                }
            }
            Ok::<_, DumpError>(())
        });
    } else {
        let cells: Vec<Cell> = rest.split(|b| *b == b'\n').take(8).map(cell).collect();
        let mut lists = AllowLists::default();
        for with_name in [true, false] {
            if let Ok(r) = sqlgrey::parse_awl(&cells, with_name) {
                lists.add(&r);
                let _ = group_of(&engine, r.net);
            }
        }
        if let Ok(r) = sqlgrey::parse_connect(&cells) {
            let _ = lists.covers(&r);
            let _ = key_of(&engine, r.net, &r.sender, &r.recipient);
        }
    }
});
