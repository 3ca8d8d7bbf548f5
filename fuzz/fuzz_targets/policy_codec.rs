//! Fuzzes the Postfix policy codec: any bytes, fed in any chunk size, never panic, never
//! over-consume or over-buffer, and every decoded request survives `encode` + decode unchanged.
#![no_main]

use greygate::proto::policy::{Decoder, Limits, PolicyRequest};
use libfuzzer_sys::fuzz_target;

// Small limits, so that short inputs reach the limit paths too.
const LIMITS: Limits = Limits {
    max_line: 64,
    max_attributes: 8,
};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new(LIMITS);
    let mut buf = Vec::new();
    for piece in data.chunks(usize::from(chunk).max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let Ok((consumed, request)) = decoder.decode(&buf) else {
                return; // the caller closes the connection; nothing more to check
            };
            assert!(consumed <= buf.len());
            buf.drain(..consumed);
            let Some(request) = request else { break };
            assert!(!request.is_empty() && request.len() <= LIMITS.max_attributes);
            assert_round_trip(&request);
        }
        // At most one partial line (plus a '\r' that may start its CRLF) is ever kept.
        assert!(buf.len() <= LIMITS.max_line + 1);
    }
});

fn assert_round_trip(request: &PolicyRequest) {
    let mut encoded = Vec::new();
    request.encode(&mut encoded);
    // Lossy UTF-8 decoding turns an invalid byte into a 3-byte U+FFFD, so a line may have grown.
    let mut decoder = Decoder::new(Limits {
        max_line: LIMITS.max_line * 3,
        ..LIMITS
    });
    assert_eq!(
        decoder.decode(&encoded),
        Ok((encoded.len(), Some(request.clone())))
    );
    assert!(!decoder.in_request());
}
