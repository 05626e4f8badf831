//! Port ranges as LPM port prefixes (reference §2.3, Cilium's `WithPortPrefix`).
//!
//! Owns the conversion of an inclusive `port..=endPort` range into the minimal set of
//! power-of-two-aligned prefixes over the 16 port bits, which is how ranges are stored in
//! the LPM policy map. Pure arithmetic; no policy knowledge.

use serde::Serialize;

/// A block of ports: `port` with the low `16 - prefix_len` bits wildcarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortPrefix {
    /// First port of the block (aligned to the block size).
    pub port: u16,
    /// Number of significant port bits (0 = all ports, 16 = one port).
    pub prefix_len: u8,
}

impl PortPrefix {
    /// A single port.
    pub fn single(port: u16) -> PortPrefix {
        PortPrefix {
            port,
            prefix_len: 16,
        }
    }

    /// All ports.
    pub const ALL: PortPrefix = PortPrefix {
        port: 0,
        prefix_len: 0,
    };

    /// Mask of the significant bits.
    pub fn mask(self) -> u16 {
        if self.prefix_len == 0 {
            0
        } else {
            u16::MAX << (16 - u32::from(self.prefix_len.min(16)))
        }
    }

    /// First port covered.
    pub fn first(self) -> u16 {
        self.port & self.mask()
    }

    /// Last port covered.
    pub fn last(self) -> u16 {
        self.first() | !self.mask()
    }

    /// True if `port` is in the block.
    pub fn contains(self, port: u16) -> bool {
        port & self.mask() == self.first()
    }

    /// True if `other` lies within `self`.
    pub fn covers(self, other: PortPrefix) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.port)
    }
}

/// The minimal list of aligned prefixes covering exactly `first..=last` (in ascending
/// order). `first > last` yields an empty list.
pub fn range_to_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // Largest block aligned at `start` that does not pass `end`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << size_log) - 1 > end {
            size_log -= 1;
        }
        // `start` fits in 16 bits here because start <= end <= 65535.
        out.push(PortPrefix {
            port: start as u16,
            prefix_len: (16 - size_log) as u8,
        });
        start += 1u32 << size_log;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_ranges() {
        assert_eq!(range_to_prefixes(80, 80), vec![PortPrefix::single(80)]);
        assert_eq!(range_to_prefixes(0, 65535), vec![PortPrefix::ALL]);
        // keyWithPortMask(0,64,0xffc0,…) = ports 64-127 (mapstate_test.go)
        assert_eq!(
            range_to_prefixes(64, 127),
            vec![PortPrefix {
                port: 64,
                prefix_len: 10
            }]
        );
        assert_eq!(
            PortPrefix {
                port: 64,
                prefix_len: 10
            }
            .mask(),
            0xffc0
        );
        assert_eq!(
            range_to_prefixes(80, 83),
            vec![PortPrefix {
                port: 80,
                prefix_len: 14
            }]
        );
        assert_eq!(
            range_to_prefixes(1, 4),
            vec![
                PortPrefix::single(1),
                PortPrefix {
                    port: 2,
                    prefix_len: 15
                },
                PortPrefix::single(4)
            ]
        );
        assert!(range_to_prefixes(10, 9).is_empty());
        assert_eq!(
            range_to_prefixes(65535, 65535),
            vec![PortPrefix::single(65535)]
        );
    }

    proptest! {
        /// Every port in the range is covered exactly once, none outside, blocks aligned.
        #[test]
        fn prefixes_cover_exactly(a in any::<u16>(), b in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let ps = range_to_prefixes(lo, hi);
            prop_assert!(!ps.is_empty());
            // at most 2*16 prefixes for any range
            prop_assert!(ps.len() <= 32);
            let mut next = u32::from(lo);
            for p in &ps {
                prop_assert_eq!(p.port & !p.mask(), 0, "unaligned {:?}", p);
                prop_assert_eq!(u32::from(p.first()), next);
                next = u32::from(p.last()) + 1;
            }
            prop_assert_eq!(next, u32::from(hi) + 1);
        }

        /// Sampled membership check against the definition.
        #[test]
        fn membership(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let ps = range_to_prefixes(lo, hi);
            let covered = ps.iter().filter(|p| p.contains(probe)).count();
            prop_assert_eq!(covered, usize::from((lo..=hi).contains(&probe)));
        }
    }
}
