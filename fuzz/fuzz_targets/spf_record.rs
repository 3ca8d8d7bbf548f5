//! Fuzzes `greygate lists update`'s SPF record parser: any text parses or fails, never
//! panics; what parses keeps its bounds (host bits cleared, prefix lengths in range), and
//! every domain-spec expands to a domain name or says why not.
#![no_main]

use greygate::lists::record::{self, Expand, Mechanism, Term, is_domain_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Also as a record: the fuzzer need not find the version tag itself.
    for txt in [text.to_string(), format!("v=spf1 {text}")] {
        let Ok(rec) = record::parse(&txt) else {
            continue;
        };
        assert!(txt.len() <= record::MAX_RECORD_LEN);
        let _ = rec.redirect();
        for term in &rec.terms {
            let spec = match term {
                Term::Directive(_, m) => match m {
                    Mechanism::Ip4(n) => {
                        assert_eq!(*n, n.trunc());
                        None
                    }
                    Mechanism::Ip6(n) => {
                        assert_eq!(*n, n.trunc());
                        None
                    }
                    Mechanism::A { domain, v4, v6 } | Mechanism::Mx { domain, v4, v6 } => {
                        assert!(*v4 <= 32 && *v6 <= 128);
                        domain.as_ref()
                    }
                    Mechanism::Include(d) | Mechanism::Exists(d) => Some(d),
                    Mechanism::Ptr(d) => d.as_ref(),
                    Mechanism::All => None,
                },
                Term::Redirect(d) => Some(d),
                Term::Other => None,
            };
            if let Some(spec) = spec {
                match spec.expand("mail.example.com", "example.com") {
                    Ok(name) => assert!(is_domain_name(&name), "{spec} -> {name:?}"),
                    Err(Expand::Dynamic(c)) => assert!("slihpv".contains(c), "{c}"),
                    Err(Expand::NotADomain(_)) => {}
                }
            }
        }
    }
});
