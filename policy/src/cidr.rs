//! IP prefixes (`10.0.0.0/8`, `2001:db8::/32`): parsing, canonical form and containment.
//!
//! Owns the prefix type used by CIDR rules, `cidr:` labels and the ipcache prefix list.
//! Kept in-crate (instead of a dependency) because only parsing and containment are needed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A network prefix with host bits zeroed. Ordered IPv4 before IPv6, then by address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// The address part is not an IP address.
    #[error("`{0}` is not an IP address or prefix")]
    Address(String),
    /// The length is not a number within the family's bit count.
    #[error("`{0}` has an invalid prefix length")]
    Length(String),
    /// The address has bits set beyond the prefix length (`10.0.0.1/8`).
    #[error("`{0}` has host bits set (did you mean {1}?)")]
    HostBits(String, String),
}

impl IpPrefix {
    /// A prefix; host bits are cleared. `None` if `len` exceeds the family's bits.
    pub fn new(addr: IpAddr, len: u8) -> Option<IpPrefix> {
        if len > max_len(addr) {
            return None;
        }
        Some(IpPrefix {
            addr: mask(addr, len),
            len,
        })
    }

    /// A single-address prefix (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> IpPrefix {
        IpPrefix {
            addr,
            len: max_len(addr),
        }
    }

    /// Parses `IP/len` strictly (host bits must be zero, as Go's `netip.ParsePrefix`
    /// accepts but Cilium then masks; we reject to catch typos early).
    pub fn parse_strict(s: &str) -> Result<IpPrefix, PrefixError> {
        let p = IpPrefix::from_str(s)?;
        let (addr, _) = split(s)?;
        if p.addr != addr {
            return Err(PrefixError::HostBits(s.to_owned(), p.to_string()));
        }
        Ok(p)
    }

    /// Parses a prefix or a bare address (`toCIDR` accepts both).
    pub fn parse_addr_or_prefix(s: &str) -> Result<IpPrefix, PrefixError> {
        if s.contains('/') {
            IpPrefix::from_str(s)
        } else {
            IpAddr::from_str(s)
                .map(IpPrefix::host)
                .map_err(|_| PrefixError::Address(s.to_owned()))
        }
    }

    /// The (masked) network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True for `/0`.
    pub fn is_default_route(&self) -> bool {
        self.len == 0
    }

    /// True for IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// True if `other` lies entirely within `self` (same family, not shorter).
    pub fn contains_prefix(&self, other: &IpPrefix) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && other.len >= self.len
            && mask(other.addr, self.len) == self.addr
    }

    /// True if `ip` lies within `self`.
    pub fn contains_addr(&self, ip: IpAddr) -> bool {
        self.contains_prefix(&IpPrefix::host(ip))
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

fn split(s: &str) -> Result<(IpAddr, u8), PrefixError> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| PrefixError::Length(s.to_owned()))?;
    let addr = IpAddr::from_str(a).map_err(|_| PrefixError::Address(s.to_owned()))?;
    // Only plain decimal digits: Go's ParsePrefix rejects signs and leading zeros.
    if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || (l.len() > 1 && l.starts_with('0'))
    {
        return Err(PrefixError::Length(s.to_owned()));
    }
    let len: u8 = l.parse().map_err(|_| PrefixError::Length(s.to_owned()))?;
    if len > max_len(addr) {
        return Err(PrefixError::Length(s.to_owned()));
    }
    Ok((addr, len))
}

impl FromStr for IpPrefix {
    type Err = PrefixError;
    /// Parses `IP/len`, masking host bits (Cilium masks prefixes it stores).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = split(s)?;
        Ok(IpPrefix {
            addr: mask(addr, len),
            len,
        })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contain() {
        let p: IpPrefix = "10.0.0.0/8".parse().unwrap();
        assert!(p.contains_prefix(&"10.1.0.0/16".parse().unwrap()));
        assert!(!p.contains_prefix(&"0.0.0.0/0".parse().unwrap()));
        assert!(!p.contains_prefix(&"11.0.0.0/16".parse().unwrap()));
        assert!(p.contains_addr("10.2.3.4".parse().unwrap()));
        let all6: IpPrefix = "::/0".parse().unwrap();
        assert!(!all6.contains_prefix(&p));
        assert_eq!(
            "10.0.0.1/8".parse::<IpPrefix>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!(IpPrefix::parse_strict("10.0.0.1/8").is_err());
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0.0/-1".parse::<IpPrefix>().is_err());
        assert!("10.0.0.0".parse::<IpPrefix>().is_err());
        assert_eq!(
            IpPrefix::parse_addr_or_prefix("1.1.1.1")
                .unwrap()
                .to_string(),
            "1.1.1.1/32"
        );
        assert_eq!(
            IpPrefix::parse_addr_or_prefix("2001:db8::1")
                .unwrap()
                .to_string(),
            "2001:db8::1/128"
        );
    }
}
