//! Fuzzes `greygate probe --file`'s destinations parser: any bytes parse or fail with line
//! errors, never panic, and every destination it accepts is an address RCPT TO can carry
//! with a server that is `host:port`.
#![no_main]

use greygate::tools::outbound::targets::{ParseOptions, check_address, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = ParseOptions {
        local_part: "postmaster",
        default_port: 25,
    };
    match parse(data, &opts) {
        Ok(targets) => {
            for t in targets {
                assert!(check_address(&t.recipient).is_ok(), "{t:?}");
                if let Some(server) = &t.server {
                    let port = server.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
                    assert!(matches!(port, Some(Ok(p)) if p > 0), "{t:?}");
                }
            }
        }
        Err(e) => {
            let _ = e.render("fuzz");
        }
    }
});
