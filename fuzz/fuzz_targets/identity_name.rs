//! Fuzzes host-name judgement: any text with any address gives a dynamic/not-dynamic
//! answer and a registrable domain (a suffix of the name) without panicking, and an
//! org identity is only ever chosen for a name that is not dynamic.
#![no_main]

use std::net::IpAddr;

use greygate::engine::identity::{
    DEFAULT_ORDER, HostName, IdentityFacts, IdentityKind, choose, dynamic_name,
    registrable_domain,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (addr, name) = data.split_at(17);
    let ip: IpAddr = if addr[0] & 1 == 0 {
        IpAddr::from(<[u8; 4]>::try_from(&addr[1..5]).expect("4 bytes"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&addr[1..17]).expect("16 bytes"))
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let lower = name.to_ascii_lowercase();
    let dynamic = dynamic_name(&lower, ip);
    if let Some(domain) = registrable_domain(&lower) {
        assert!(lower.trim_end_matches('.').ends_with(domain));
    }
    let facts = IdentityFacts {
        name: HostName::Verified(name.to_string()),
        ..IdentityFacts::default()
    };
    let id = choose(&DEFAULT_ORDER, ip, "", Some(&facts), || "prefix".into());
    if id.why.kind == IdentityKind::Org {
        assert!(dynamic.is_none(), "{name:?} is dynamic yet chosen as org");
        assert!(id.key.starts_with("org:"));
    } else {
        assert_eq!(id.key, "prefix");
    }
});
