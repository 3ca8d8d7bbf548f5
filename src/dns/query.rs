//! The pure parts of gathering DNS facts: query names of DNS lists, what their answers
//! mean, what the MTA already said about the client's host name, and the addresses the
//! over-broad SPF check tries.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::engine::HostName;

/// The name to query under a DNS list `zone` for `ip`: reversed octets for IPv4
/// (`7.100.51.198.zone.`), reversed nibbles for IPv6 (RFC 5782), absolute (trailing dot) so
/// no search domain is ever appended. `ip` should be canonical (IPv4-mapped IPv6 as IPv4).
pub fn list_query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    let mut name = String::with_capacity(72 + zone.len());
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            let _ = write!(name, "{d}.{c}.{b}.{a}.");
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
        }
    }
    name.push_str(zone);
    name.push('.');
    name
}

/// What one DNS list zone said about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListAnswer {
    /// Listed, with the return codes (all in 127.0.0.0/8).
    Listed(Vec<Ipv4Addr>),
    /// NXDOMAIN (or no A record): not listed.
    NotListed,
    /// The zone answered, but not about the client: Spamhaus-style error codes in
    /// 127.255.255.0/24 ("query refused": public resolver, over quota, unknown key), or
    /// addresses outside 127.0.0.0/8 (a resolver that rewrites NXDOMAIN). Neither counts as
    /// a listing, nor as a clean bill.
    Refused(Vec<Ipv4Addr>),
}

/// Classifies the A records a zone returned for a client's query name.
pub fn classify_list_answer(addrs: &[Ipv4Addr]) -> ListAnswer {
    if addrs.is_empty() {
        return ListAnswer::NotListed;
    }
    let (listed, refused): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
        addrs.iter().partition(|a| is_listing_code(**a));
    if listed.is_empty() {
        ListAnswer::Refused(refused)
    } else {
        ListAnswer::Listed(listed)
    }
}

/// 127.0.0.0/8 except 127.255.255.0/24, which zones use for errors about the query itself.
fn is_listing_code(a: Ipv4Addr) -> bool {
    let [first, b, c, _] = a.octets();
    first == 127 && !(b == 255 && c == 255)
}

/// The host name as the MTA already judged it, or `None` when the front end does not say
/// and the gatherer must look it up itself.
///
/// Postfix sends `client_name` (the PTR name, forward-confirmed, or `unknown`) and
/// `reverse_client_name` (the PTR name unconfirmed, or `unknown`); both come from lookups it
/// has done already, so asking DNS again would only cost time:
/// - `client_name` is a name: Postfix confirmed it forward → verified;
/// - `client_name` is `unknown` but `reverse_client_name` was sent (a name or `unknown`):
///   Postfix looked, and no name confirmed → unverified;
/// - neither is known (empty `reverse_client_name`): a milter front end whose MTA gave no
///   name (Sendmail's `[192.0.2.1]`, Postfix's `unknown` at connect), or `explain` without
///   `--name` → the gatherer does PTR and A/AAAA itself with `[dns] ptr_lookup`, and
///   otherwise leaves the name unknown (no `org:` identity).
pub fn mta_host_name(client_name: &str, reverse_client_name: &str) -> Option<HostName> {
    let name = client_name.trim();
    if !name.is_empty() && !name.eq_ignore_ascii_case("unknown") && !name.starts_with('[') {
        return Some(HostName::Verified(
            name.trim_end_matches('.').to_ascii_lowercase(),
        ));
    }
    if !reverse_client_name.trim().is_empty() {
        return Some(HostName::Unverified);
    }
    None
}

/// Addresses that a sender's SPF record must not pass if its pass is to mean anything: one
/// that nobody can send from (240.0.0.1, reserved; `100::1`, the IPv6 discard prefix) and
/// the client's antipode (its first bit flipped: the other half of the address space).
/// `+all`, a bare `all`, `ip4:0.0.0.0/0` or an `exists:` that answers for every address
/// pass both; a real pool record passes neither.
pub fn spf_canaries(ip: IpAddr) -> [IpAddr; 2] {
    match ip {
        IpAddr::V4(v4) => [
            IpAddr::V4(Ipv4Addr::new(240, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) ^ 0x8000_0000)),
        ],
        IpAddr::V6(v6) => [
            IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) ^ (1 << 127))),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_names() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "198.51.100.7",
                "bl.example.test",
                "7.100.51.198.bl.example.test.",
            ),
            (
                "127.0.0.2",
                "zen.spamhaus.org.",
                "2.0.0.127.zen.spamhaus.org.",
            ),
            (
                // RFC 5782 section 2.4's example.
                "2001:db8:1:2:3:4:567:89ab",
                "ugly.example.com",
                "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com.",
            ),
        ];
        for (ip, zone, want) in cases {
            assert_eq!(list_query_name(ip.parse().unwrap(), zone), *want, "{ip}");
        }
    }

    #[test]
    fn list_answers() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let cases: Vec<(Vec<Ipv4Addr>, ListAnswer)> = vec![
            (vec![], ListAnswer::NotListed),
            (
                vec![a("127.0.0.2")],
                ListAnswer::Listed(vec![a("127.0.0.2")]),
            ),
            (
                vec![a("127.0.0.4"), a("127.0.0.10")],
                ListAnswer::Listed(vec![a("127.0.0.4"), a("127.0.0.10")]),
            ),
            // Spamhaus: public resolver, typo'd zone, over quota.
            (
                vec![a("127.255.255.254")],
                ListAnswer::Refused(vec![a("127.255.255.254")]),
            ),
            (
                vec![a("127.255.255.252")],
                ListAnswer::Refused(vec![a("127.255.255.252")]),
            ),
            (
                vec![a("127.255.255.255")],
                ListAnswer::Refused(vec![a("127.255.255.255")]),
            ),
            // An ISP resolver that "helpfully" answers NXDOMAIN with its search page.
            (
                vec![a("203.0.113.80")],
                ListAnswer::Refused(vec![a("203.0.113.80")]),
            ),
            // A real code next to an error code still lists.
            (
                vec![a("127.255.255.254"), a("127.0.0.3")],
                ListAnswer::Listed(vec![a("127.0.0.3")]),
            ),
            // 127.255.0.1 is not in the error block.
            (
                vec![a("127.255.0.1")],
                ListAnswer::Listed(vec![a("127.255.0.1")]),
            ),
        ];
        for (addrs, want) in cases {
            assert_eq!(classify_list_answer(&addrs), want, "{addrs:?}");
        }
    }

    #[test]
    fn host_names_from_the_mta() {
        let v = |n: &str| Some(HostName::Verified(n.into()));
        let cases: &[(&str, &str, Option<HostName>)] = &[
            (
                "mail.example.com",
                "mail.example.com",
                v("mail.example.com"),
            ),
            ("Mail.Example.COM.", "", v("mail.example.com")),
            ("unknown", "ptr.example.net", Some(HostName::Unverified)),
            ("unknown", "unknown", Some(HostName::Unverified)),
            ("unknown", "", None),
            ("", "", None),
            ("[192.0.2.1]", "", None),
        ];
        for (name, reverse, want) in cases {
            assert_eq!(&mta_host_name(name, reverse), want, "{name:?} {reverse:?}");
        }
    }

    #[test]
    fn canaries_are_far_from_the_client() {
        let [reserved, antipode] = spf_canaries("198.51.100.7".parse().unwrap());
        assert_eq!(reserved, "240.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(antipode, "70.51.100.7".parse::<IpAddr>().unwrap());
        let [reserved, antipode] = spf_canaries("2001:db8::1".parse().unwrap());
        assert_eq!(reserved, "100::1".parse::<IpAddr>().unwrap());
        assert_eq!(antipode, "a001:db8::1".parse::<IpAddr>().unwrap());
    }
}
