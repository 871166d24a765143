//! Where tasks may go (issue 16): the target guard, shared by the broker
//! (which checks a task's URL at enqueue) and the gateway (which checks
//! every address a host name resolves to, at delivery).
//!
//! Rules are CIDR ranges (`10.0.0.0/8`, `fd00::/8`, a bare address for
//! one host) and host names (`metadata.google.internal`, or `*.internal`
//! for every name under it). A target that an allow rule matches is
//! allowed; otherwise one that a deny rule matches is refused; anything
//! else is allowed. The deny rules always include [`DEFAULT_DENY`]
//! (link-local ranges, cloud metadata endpoints, and the unspecified
//! addresses `0.0.0.0` and `::`). So a strict configuration denies the
//! private ranges too, or everything (`0.0.0.0/0,::/0`) and allows the
//! targets it trusts.
//!
//! Addresses are compared after normalisation: the URL parser already
//! writes `127.1`, `2130706433` and `0x7f000001` as `127.0.0.1`; an
//! IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is compared as the IPv4
//! address it maps.

use std::net::IpAddr;

/// Denied unless allowed: link-local (the metadata services of most
/// clouds live there), the metadata names and addresses of Google,
/// Alibaba and AWS (IPv6), and the unspecified addresses.
pub const DEFAULT_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "metadata.google.internal",
    "metadata",
    "100.100.100.200",
    "fd00:ec2::254",
    "0.0.0.0",
    "::",
];

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Net {
        addr: IpAddr,
        prefix: u8,
    },
    Name(String),
    /// `*.suffix`: the names under `suffix`.
    Under(String),
}

/// The allow and deny rules.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetGuard {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Default for TargetGuard {
    fn default() -> Self {
        TargetGuard::new(&[], &[]).unwrap_or(TargetGuard {
            allow: Vec::new(),
            deny: Vec::new(),
        })
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err("an empty target rule".into());
    }
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s.as_str(), None),
    };
    let addr_text = addr.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = addr_text.parse::<IpAddr>() {
        let ip = canonical(ip);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("target rule {s:?}: a prefix length of 0 to {max}"))?,
        };
        return Ok(Rule::Net { addr: ip, prefix });
    }
    if prefix.is_some() {
        return Err(format!("target rule {s:?} is not an address range"));
    }
    let name = s.trim_end_matches('.');
    let valid = |n: &str| {
        !n.is_empty()
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    match name.strip_prefix("*.") {
        Some(under) if valid(under) => Ok(Rule::Under(under.to_string())),
        None if valid(name) => Ok(Rule::Name(name.to_string())),
        _ => Err(format!(
            "target rule {s:?}: expected an address, a range (10.0.0.0/8) or a host name (*.example.com)"
        )),
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Rule {
    fn matches_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Rule::Net { addr, prefix } if in_net(ip, *addr, *prefix))
    }

    fn matches_name(&self, name: &str) -> bool {
        match self {
            Rule::Name(n) => n == name,
            Rule::Under(u) => {
                name.len() > u.len()
                    && name.ends_with(u.as_str())
                    && name[..name.len() - u.len()].ends_with('.')
            }
            Rule::Net { .. } => false,
        }
    }

    fn text(&self) -> String {
        match self {
            Rule::Net { addr, prefix } => format!("{addr}/{prefix}"),
            Rule::Name(n) => n.clone(),
            Rule::Under(u) => format!("*.{u}"),
        }
    }
}

impl TargetGuard {
    /// The guard of `--allow-targets` and `--deny-targets` (the deny rules
    /// beside [`DEFAULT_DENY`]).
    pub fn new(allow: &[String], deny: &[String]) -> Result<TargetGuard, String> {
        let allow = allow
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_rule(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rules: Vec<Rule> = DEFAULT_DENY
            .iter()
            .map(|s| parse_rule(s))
            .collect::<Result<Vec<_>, _>>()?;
        for s in deny.iter().filter(|s| !s.trim().is_empty()) {
            rules.push(parse_rule(s)?);
        }
        Ok(TargetGuard { allow, deny: rules })
    }

    /// Checks an address a delivery would connect to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self.allow.iter().any(|r| r.matches_ip(ip)) {
            return Ok(());
        }
        match self.deny.iter().find(|r| r.matches_ip(ip)) {
            Some(r) => Err(format!(
                "the target address {ip} is denied ({}; --allow-targets lets it through)",
                r.text()
            )),
            None => Ok(()),
        }
    }

    /// Checks a URL's host as the URL parser wrote it: an address (an
    /// IPv6 one in brackets) or a host name. A name is checked against
    /// the name rules only; its addresses are checked at delivery.
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip);
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if self.allow.iter().any(|r| r.matches_name(&name)) {
            return Ok(());
        }
        match self.deny.iter().find(|r| r.matches_name(&name)) {
            Some(r) => Err(format!(
                "the target host {name} is denied ({}; --allow-targets lets it through)",
                r.text()
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_defaults_deny_metadata_and_link_local_only() {
        let g = TargetGuard::default();
        for bad in [
            "169.254.169.254",
            "fe80::1",
            "100.100.100.200",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "::ffff:169.254.1.1",
        ] {
            assert!(g.check_ip(ip(bad)).is_err(), "{bad}");
        }
        for good in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "8.8.8.8", "::1"] {
            assert!(g.check_ip(ip(good)).is_ok(), "{good}");
        }
        assert!(g.check_host("metadata.google.internal").is_err());
        assert!(g.check_host("METADATA.google.internal.").is_err());
        assert!(g.check_host("metadata").is_err());
        assert!(g.check_host("[fd00:ec2::254]").is_err());
        assert!(g.check_host("example.com").is_ok());
        let e = g.check_host("169.254.169.254").unwrap_err();
        assert!(
            e.contains("169.254.0.0/16") && e.contains("--allow-targets"),
            "{e}"
        );
    }

    #[test]
    fn allow_wins_over_deny_and_names_nest() {
        let g = TargetGuard::new(
            &["127.0.0.1".into(), "ok.internal".into()],
            &[
                "127.0.0.0/8".into(),
                "::1".into(),
                "10.0.0.0/8".into(),
                "*.internal".into(),
            ],
        )
        .unwrap();
        assert!(g.check_ip(ip("127.0.0.1")).is_ok());
        assert!(g.check_ip(ip("127.0.0.2")).is_err());
        assert!(g.check_ip(ip("::ffff:127.0.0.2")).is_err());
        assert!(g.check_ip(ip("::1")).is_err());
        assert!(g.check_ip(ip("10.200.0.1")).is_err());
        assert!(g.check_host("a.b.internal").is_err());
        assert!(g.check_host("internal").is_ok());
        assert!(g.check_host("ok.internal").is_ok());
        assert!(g.check_host("notinternal").is_ok());
        let everything = TargetGuard::new(
            &["192.0.2.0/24".into()],
            &["0.0.0.0/0".into(), "::/0".into()],
        )
        .unwrap();
        assert!(everything.check_ip(ip("192.0.2.9")).is_ok());
        assert!(everything.check_ip(ip("8.8.8.8")).is_err());
        assert!(everything.check_ip(ip("2001:db8::1")).is_err());
    }

    #[test]
    fn bad_rules_are_refused() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "exa mple.com",
            "*.",
            "a..b",
            "host/8",
        ] {
            assert!(TargetGuard::new(&[], &[bad.into()]).is_err(), "{bad}");
        }
    }
}
