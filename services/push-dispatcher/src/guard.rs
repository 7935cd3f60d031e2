//! Where the dispatcher may send: push services are on the public internet,
//! so, unless `--push-allow-private-addresses` says otherwise, a subscription
//! endpoint may not point into the deployment's own network (loopback,
//! private ranges, link-local cloud metadata, ...). Anyone who may register a
//! subscription chooses its endpoint URL; without this, the dispatcher would
//! POST to internal services on their behalf.
//!
//! Two checks, because a name can change what it resolves to after it was
//! registered: registration refuses an endpoint whose host is a literal
//! non-public address, and every request resolves names through
//! [`PublicResolver`], which drops non-public addresses (and fails when none
//! is left), so what is checked is what is connected to. Redirects are not
//! followed at all.

use std::{
    error::Error,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// True for an address a push service may have: not loopback, private,
/// shared (CGNAT), link-local, unspecified, broadcast, multicast,
/// documentation, benchmarking or reserved; for IPv6 also not unique-local,
/// and IPv4-mapped or NAT64 addresses are judged by the IPv4 address inside.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space, RFC 6598
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking, RFC 2544
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = seg[6].to_be_bytes();
        let [c, d] = seg[7].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || seg[..5] == [0, 0, 0, 0, 0]) // IPv4-compatible and other reserved
}

/// The reason an endpoint's literal host is refused, if it is.
pub(crate) fn literal_host_refusal(url: &url::Url) -> Option<String> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    (!is_public(ip)).then(|| {
        format!(
            "endpoint host {ip} is not a public address; push services are on the \
             internet (--push-allow-private-addresses allows this for a local push service)"
        )
    })
}

/// An endpoint whose name resolves to no public address: not worth retrying.
#[derive(Debug)]
pub(crate) struct NotPublic(String);

impl std::fmt::Display for NotPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for NotPublic {}

impl NotPublic {
    /// The refusal somewhere in `e`'s chain of causes, if any.
    pub(crate) fn find<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a NotPublic> {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(found) = c.downcast_ref::<NotPublic>() {
                return Some(found);
            }
            cause = c.source();
        }
        None
    }
}

/// A DNS resolver that keeps only public addresses.
pub(crate) struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> =
                all.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                let found: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
                let e: Box<dyn Error + Send + Sync> = Box::new(NotPublic(format!(
                    "{host} resolves to no public address ({}); push services are on \
                     the internet (--push-allow-private-addresses allows this)",
                    found.join(", ")
                )));
                return Err(e);
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!public(ip), "{ip} counted as public");
        }
    }

    #[test]
    fn internet_addresses_are_public() {
        for ip in [
            "142.250.74.36",
            "1.1.1.1",
            "100.128.0.1",
            "2a00:1450:4001:80b::200a",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(public(ip), "{ip} counted as internal");
        }
    }

    #[test]
    fn only_literal_internal_hosts_are_refused_at_registration() {
        let refused = |u: &str| literal_host_refusal(&url::Url::parse(u).unwrap());
        assert!(refused("https://127.0.0.1/push").is_some());
        assert!(refused("https://[::1]:8443/push").is_some());
        assert!(refused("https://169.254.169.254/latest").is_some());
        assert!(refused("https://fcm.googleapis.com/fcm/send/x").is_none());
        assert!(refused("https://8.8.8.8/x").is_none());
        // A name is judged when it is resolved, at sending time.
        assert!(refused("https://localhost/x").is_none());
    }

    #[tokio::test]
    async fn names_resolving_only_to_internal_addresses_fail() {
        let name: Name = "localhost".parse().unwrap();
        let err = match PublicResolver.resolve(name).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("no public address"), "{err}");
        assert!(err.contains("127.0.0.1") || err.contains("::1"), "{err}");
    }
}
