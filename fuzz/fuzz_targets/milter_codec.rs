//! Fuzzes the milter codec: any bytes decode to frames, `Incomplete` or an error without
//! panicking; every decoded command re-encodes to bytes that decode to itself; a reply's
//! encoding (which turns CR/LF in reply text into spaces) is stable once encoded.
#![no_main]

use greygate::proto::milter::{Decoded, decode_command, decode_reply};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Frame(cmd, used)) = decode_command(rest, MAX) {
        assert!(used >= 5 && used <= rest.len());
        let mut enc = Vec::new();
        cmd.encode(&mut enc);
        match decode_command(&enc, usize::MAX) {
            Ok(Decoded::Frame(again, n)) => {
                assert_eq!(again, cmd);
                assert_eq!(n, enc.len());
            }
            other => panic!("re-encoded command did not decode: {other:?}"),
        }
        rest = &rest[used..];
    }
    if let Ok(Decoded::Frame(reply, used)) = decode_reply(data, MAX) {
        assert!(used <= data.len());
        let mut enc = Vec::new();
        reply.encode(&mut enc);
        let Ok(Decoded::Frame(again, _)) = decode_reply(&enc, usize::MAX) else {
            panic!("re-encoded reply did not decode: {enc:?}");
        };
        let mut enc2 = Vec::new();
        again.encode(&mut enc2);
        assert_eq!(enc, enc2);
    }
});
