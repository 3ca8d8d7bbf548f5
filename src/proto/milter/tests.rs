//! Milter codec tests: a table of frames, round trips, every split point, bounds, junk.

use super::*;

fn frame_bytes(command: u8, data: &[u8]) -> Vec<u8> {
    let mut v = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    v.push(command);
    v.extend_from_slice(data);
    v
}

fn decode_one(bytes: &[u8]) -> Result<Command, DecodeError> {
    match decode_command(bytes, DEFAULT_MAX_FRAME)? {
        Decoded::Frame(c, used) => {
            assert_eq!(used, bytes.len(), "whole frame used");
            Ok(c)
        }
        Decoded::Incomplete => panic!("incomplete: {bytes:?}"),
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

#[test]
fn commands_table() {
    let optneg = [
        &6u32.to_be_bytes()[..],
        &0x1ffu32.to_be_bytes(),
        &0x1fffffu32.to_be_bytes(),
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, Command)> = vec![
        (
            "optneg",
            frame_bytes(b'O', &optneg),
            Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1fffff,
            },
        ),
        (
            "optneg with extra fields",
            frame_bytes(b'O', &[optneg.clone(), vec![0, 0, 0, 1]].concat()),
            Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1fffff,
            },
        ),
        (
            "macros",
            frame_bytes(b'D', b"M{auth_authen}\0alice\0i\0ABC123\0"),
            Command::Macros {
                for_cmd: b'M',
                pairs: vec![(s("{auth_authen}"), s("alice")), (s("i"), s("ABC123"))],
            },
        ),
        (
            "macros, none",
            frame_bytes(b'D', b"C"),
            Command::Macros {
                for_cmd: b'C',
                pairs: vec![],
            },
        ),
        (
            "connect ipv4",
            frame_bytes(b'C', b"mail.example.net\x004\x00\x19192.0.2.1\0"),
            Command::Connect {
                hostname: s("mail.example.net"),
                family: Family::Inet,
                port: 25,
                address: s("192.0.2.1"),
            },
        ),
        (
            "connect ipv6",
            frame_bytes(b'C', b"[2001:db8::1]\x006\x30\x392001:db8::1\0"),
            Command::Connect {
                hostname: s("[2001:db8::1]"),
                family: Family::Inet6,
                port: 12345,
                address: s("2001:db8::1"),
            },
        ),
        (
            "connect unix",
            frame_bytes(b'C', b"localhost\0L\0\0/run/x.sock\0"),
            Command::Connect {
                hostname: s("localhost"),
                family: Family::Unix,
                port: 0,
                address: s("/run/x.sock"),
            },
        ),
        (
            "connect unknown family",
            frame_bytes(b'C', b"unknown\0U"),
            Command::Connect {
                hostname: s("unknown"),
                family: Family::Unknown,
                port: 0,
                address: s(""),
            },
        ),
        (
            "helo",
            frame_bytes(b'H', b"client.example.net\0"),
            Command::Helo(s("client.example.net")),
        ),
        (
            "mail",
            frame_bytes(b'M', b"<a@example.net>\0SIZE=100\0BODY=8BITMIME\0"),
            Command::Mail(vec![
                s("<a@example.net>"),
                s("SIZE=100"),
                s("BODY=8BITMIME"),
            ]),
        ),
        (
            "mail null sender",
            frame_bytes(b'M', b"<>\0"),
            Command::Mail(vec![s("<>")]),
        ),
        (
            "rcpt",
            frame_bytes(b'R', b"<b@example.org>\0"),
            Command::Rcpt(vec![s("<b@example.org>")]),
        ),
        (
            "rcpt 8-bit",
            frame_bytes(b'R', b"<j\xfcrgen@example.org>\0"),
            Command::Rcpt(vec![s("<j\u{fffd}rgen@example.org>")]),
        ),
        (
            "header",
            frame_bytes(b'L', b"Subject\0hello\0"),
            Command::Header {
                name: s("Subject"),
                value: s("hello"),
            },
        ),
        ("eoh", frame_bytes(b'N', b""), Command::EndOfHeaders),
        ("data", frame_bytes(b'T', b""), Command::Data),
        (
            "body",
            frame_bytes(b'B', b"line\r\n"),
            Command::Body(b"line\r\n".to_vec()),
        ),
        ("eom", frame_bytes(b'E', b""), Command::EndOfMessage(vec![])),
        ("abort", frame_bytes(b'A', b""), Command::Abort),
        ("quit", frame_bytes(b'Q', b""), Command::Quit),
        (
            "quit, new connection",
            frame_bytes(b'K', b""),
            Command::QuitNewConnection,
        ),
        (
            "unknown command",
            frame_bytes(b'U', b"VRFY x\0"),
            Command::Unknown(s("VRFY x")),
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(decode_one(&bytes), Ok(want.clone()), "{name}");
        // Every prefix is incomplete, never an error or a wrong frame.
        for cut in 0..bytes.len() {
            assert_eq!(
                decode_command(&bytes[..cut], DEFAULT_MAX_FRAME),
                Ok(Decoded::Incomplete),
                "{name} cut at {cut}"
            );
        }
        // Encoding gives back bytes that decode to the same command.
        let mut enc = Vec::new();
        want.encode(&mut enc);
        assert_eq!(decode_one(&enc), Ok(want), "{name} round trip");
    }
}

#[test]
fn malformed_frames_table() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", vec![0, 0, 0, 0]),
        ("unknown command", frame_bytes(b'Z', b"")),
        ("optneg truncated", frame_bytes(b'O', &[0, 0, 0, 6, 0, 0])),
        ("connect bad family", frame_bytes(b'C', b"host\0X\0\x19a\0")),
        (
            "connect truncated port",
            frame_bytes(b'C', b"host\x004\x00"),
        ),
        (
            "connect address without NUL",
            frame_bytes(b'C', b"host\x004\x00\x19192.0.2.1"),
        ),
        (
            "connect trailing bytes",
            frame_bytes(b'C', b"host\x004\x00\x19a\0junk"),
        ),
        ("helo without NUL", frame_bytes(b'H', b"client")),
        ("mail without address", frame_bytes(b'M', b"")),
        ("rcpt without NUL", frame_bytes(b'R', b"<b@example.org>")),
        ("header missing value", frame_bytes(b'L', b"Subject\0")),
        ("macros without command byte", frame_bytes(b'D', b"")),
    ];
    for (name, bytes) in cases {
        let got = decode_command(&bytes, DEFAULT_MAX_FRAME);
        assert!(
            matches!(got, Err(DecodeError::Malformed { .. })),
            "{name}: {got:?}"
        );
        let msg = got.unwrap_err().to_string();
        assert!(msg.starts_with("malformed"), "{name}: {msg}");
    }
}

#[test]
fn oversized_frames_are_refused_from_their_header_alone() {
    let header = 1_000_000u32.to_be_bytes();
    assert_eq!(
        decode_command(&header, 1024),
        Err(DecodeError::TooLarge {
            len: 1_000_000,
            limit: 1024
        })
    );
    let exact = frame_bytes(b'B', &vec![b'x'; 1023]);
    assert!(matches!(
        decode_command(&exact, 1024),
        Ok(Decoded::Frame(Command::Body(_), 1028))
    ));
    let over = frame_bytes(b'B', &vec![b'x'; 1024]);
    assert!(matches!(
        decode_command(&over, 1024),
        Err(DecodeError::TooLarge { len: 1025, .. })
    ));
}

#[test]
fn frames_come_out_one_at_a_time() {
    let mut buf = Vec::new();
    Command::Helo(s("a")).encode(&mut buf);
    Command::Rcpt(vec![s("<b@c>")]).encode(&mut buf);
    let Ok(Decoded::Frame(first, used)) = decode_command(&buf, DEFAULT_MAX_FRAME) else {
        panic!()
    };
    assert_eq!(first, Command::Helo(s("a")));
    let Ok(Decoded::Frame(second, rest)) = decode_command(&buf[used..], DEFAULT_MAX_FRAME) else {
        panic!()
    };
    assert_eq!(second, Command::Rcpt(vec![s("<b@c>")]));
    assert_eq!(used + rest, buf.len());
}

#[test]
fn replies_round_trip() {
    let replies = [
        Reply::OptNeg {
            version: 6,
            actions: action::ADD_HEADERS,
            protocol: protocol::NO_BODY,
            macros: vec![],
        },
        Reply::OptNeg {
            version: 6,
            actions: action::ADD_HEADERS | action::SET_SYMLIST,
            protocol: 0,
            macros: vec![(stage::ENVFROM, s("{auth_authen}")), (stage::EOM, s("i"))],
        },
        Reply::Continue,
        Reply::Accept,
        Reply::Reject,
        Reply::Tempfail,
        Reply::Discard,
        Reply::Progress,
        Reply::ReplyCode(s("451 4.7.1 Greylisted, please try again in 300 seconds")),
        Reply::AddHeader {
            name: s("X-Greylist"),
            value: s("delayed 300 seconds by greygate"),
        },
        Reply::InsertHeader {
            index: 0,
            name: s("X-Greylist"),
            value: s("v"),
        },
    ];
    for r in replies {
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert_eq!(
            decode_reply(&buf, DEFAULT_MAX_FRAME),
            Ok(Decoded::Frame(r.clone(), buf.len())),
            "{r:?}"
        );
    }
}

#[test]
fn reply_text_cannot_inject_lines_or_split_strings() {
    let mut buf = Vec::new();
    Reply::ReplyCode(s("451 4.7.1 a\r\n250 ok\0x")).encode(&mut buf);
    let Ok(Decoded::Frame(Reply::ReplyCode(text), _)) = decode_reply(&buf, DEFAULT_MAX_FRAME)
    else {
        panic!("{buf:?}")
    };
    assert_eq!(text, "451 4.7.1 a  250 ok x");
}

#[test]
fn macro_names_lose_their_braces() {
    assert_eq!(macro_name("{auth_authen}"), "auth_authen");
    assert_eq!(macro_name("i"), "i");
    assert_eq!(macro_name("{"), "{");
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50_000 {
        let len = (next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Make plausible frames common: a small length prefix and a real command byte.
        if len >= 5 && next() % 2 == 0 {
            bytes[..4].copy_from_slice(&((len - 4) as u32).to_be_bytes());
            bytes[4] = b"ODCHMRLNTBEAQKU"[(next() % 15) as usize];
        }
        if let Ok(Decoded::Frame(cmd, used)) = decode_command(&bytes, 4096) {
            assert!(used <= bytes.len());
            let mut enc = Vec::new();
            cmd.encode(&mut enc);
            assert!(
                matches!(decode_command(&enc, 1 << 20), Ok(Decoded::Frame(ref c, _)) if *c == cmd)
            );
        }
        let _ = decode_reply(&bytes, 4096);
    }
}
