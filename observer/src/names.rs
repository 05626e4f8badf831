//! Hubble's and Cilium's display names: drop reasons, observation points, match types,
//! reserved identities, DNS types and codes, ICMP types. The CLI shows these strings, so
//! they are copied as facts from `pkg/monitor/api` and gopacket (which Hubble uses).

/// `pkg/monitor/api/drop.go`: the text `hubble observe` shows as the type of a drop.
pub fn drop_reason_text(code: u32) -> Option<&'static str> {
    Some(match code {
        130 => "Invalid source mac",
        131 => "Invalid destination mac",
        132 => "Invalid source ip",
        133 => "Policy denied",
        134 => "Invalid packet",
        135 => "CT: Truncated or invalid header",
        136 => "CT: Missing TCP ACK flag",
        137 => "CT: Unknown L4 protocol",
        138 => "CT: Can't create entry from packet",
        139 => "Unsupported L3 protocol",
        140 => "Missed tail call",
        141 => "Error writing to packet",
        142 => "Unknown L4 protocol",
        143 => "Unknown ICMPv4 code",
        144 => "Unknown ICMPv4 type",
        145 => "Unknown ICMPv6 code",
        146 => "Unknown ICMPv6 type",
        147 => "Error retrieving tunnel key",
        148 => "Error retrieving tunnel options",
        149 => "Invalid Geneve option",
        150 => "Unknown L3 target address",
        151 => "Stale or unroutable IP",
        152 => "No matching local container found",
        153 => "Error while correcting L3 checksum",
        154 => "Error while correcting L4 checksum",
        155 => "CT: Map insertion failed",
        156 => "Invalid IPv6 extension header",
        157 => "IP fragmentation not supported",
        158 => "Service backend not found",
        160 => "No tunnel/encapsulation endpoint (datapath BUG!)",
        161 => "Failed to insert into proxymap",
        162 => "Reached EDT rate-limiting drop horizon",
        163 => "Unknown connection tracking state",
        164 => "Local host is unreachable",
        165 => "No configuration available to perform policy decision",
        166 => "Unsupported L2 protocol",
        167 => "No mapping for NAT masquerade",
        168 => "Unsupported protocol for NAT masquerade",
        169 => "FIB lookup failed",
        170 => "Encapsulation traffic is prohibited",
        171 => "Invalid identity",
        172 => "Unknown sender",
        173 => "NAT not needed",
        174 => "Is a ClusterIP",
        175 => "First logical datagram fragment not found",
        176 => "Forbidden ICMPv6 message",
        177 => "Denied by LB src range check",
        178 => "Socket lookup failed",
        179 => "Socket assign failed",
        180 => "Proxy redirection not supported for protocol",
        181 => "Policy denied by denylist",
        189 => "Authentication required",
        _ => return None,
    })
}

/// Hubble's type column for a drop: the reason text, or the number when unknown.
pub fn drop_reason_display(code: u32) -> String {
    drop_reason_text(code).map_or_else(|| code.to_string(), str::to_owned)
}

/// `TraceObservationPoints`: the name of a trace sub-type (`to-endpoint`, …).
pub fn observation_point_name(sub_type: i32) -> Option<&'static str> {
    Some(match sub_type {
        0 => "to-endpoint",
        1 => "to-proxy",
        2 => "to-host",
        3 => "to-stack",
        4 => "to-overlay",
        5 => "from-endpoint",
        6 => "from-proxy",
        7 => "from-host",
        8 => "from-stack",
        9 => "from-overlay",
        10 => "from-network",
        11 => "to-network",
        12 => "from-crypto",
        13 => "to-crypto",
        _ => return None,
    })
}

/// The trace sub-type for a CLI observation point name (inverse of
/// [`observation_point_name`]).
pub fn observation_point_by_name(name: &str) -> Option<i32> {
    (0..=13).find(|&n| observation_point_name(n) == Some(name))
}

/// `PolicyMatchType.String()`.
pub fn match_type_name(match_type: u32) -> &'static str {
    match match_type {
        0 => "none",
        1 => "L3-Only",
        2 => "L3-L4",
        3 => "L4-Only",
        4 => "all",
        5 => "L3-Proto",
        6 => "Proto-Only",
        _ => "unknown",
    }
}

/// Reserved identities and their names (`reserved:<name>` labels; the CLI prints
/// `(<name>)` instead of `(ID:n)` for them).
pub fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    Some(match identity {
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        9 => "world-ipv4",
        10 => "world-ipv6",
        _ => return None,
    })
}

/// The identity for a reserved name (`world`) or a number (`12345`), as the CLI's
/// `--identity` accepts.
pub fn identity_by_name(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let name = name.strip_prefix("reserved:").unwrap_or(name);
    (1..=10).find(|&id| reserved_identity_name(id) == Some(name))
}

/// gopacket's `DNSType.String()`, which Hubble uses for `qtypes` and `rrtypes`.
pub fn dns_type_name(qtype: u16) -> &'static str {
    match qtype {
        1 => "A",
        2 => "NS",
        3 => "MD",
        4 => "MF",
        5 => "CNAME",
        6 => "SOA",
        7 => "MB",
        8 => "MG",
        9 => "MR",
        10 => "NULL",
        11 => "WKS",
        12 => "PTR",
        13 => "HINFO",
        14 => "MINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        41 => "OPT",
        256 => "URI",
        _ => "Unknown",
    }
}

/// gopacket's `DNSResponseCode.String()` (also Hubble's metric `rcode` label).
pub fn dns_rcode_name(rcode: u32) -> Option<&'static str> {
    Some(match rcode {
        0 => "No Error",
        1 => "Format Error",
        2 => "Server Failure",
        3 => "Non-Existent Domain",
        4 => "Not Implemented",
        5 => "Query Refused",
        6 => "Name Exists when it should not",
        7 => "RR Set Exists when it should not",
        8 => "RR Set that should exist does not",
        9 => "Not Authorized",
        10 => "Name not contained in zone",
        11 => "DSO-TYPE Not Implemented",
        16 => "Bad OPT Version",
        17 => "Key not recognized",
        18 => "Signature out of time window",
        19 => "Bad TKEY Mode",
        20 => "Duplicate key name",
        21 => "Algorithm not supported",
        22 => "Bad Truncation",
        23 => "Bad/missing Server Cookie",
        _ => return None,
    })
}

/// gopacket's `ICMPv4TypeCode.String()`: `EchoRequest`, `DestinationUnreachable(Port)`.
pub fn icmpv4_type_code(icmp_type: u8, code: u8) -> String {
    let (name, codes): (&str, &[&str]) = match icmp_type {
        0 => ("EchoReply", &[]),
        3 => (
            "DestinationUnreachable",
            &[
                "Net",
                "Host",
                "Protocol",
                "Port",
                "FragmentationNeeded",
                "SourceRoutingFailed",
                "NetUnknown",
                "HostUnknown",
                "SourceIsolated",
                "NetAdminProhibited",
                "HostAdminProhibited",
                "NetTOS",
                "HostTOS",
                "CommAdminProhibited",
                "HostPrecedence",
                "PrecedenceCutoff",
            ],
        ),
        4 => ("SourceQuench", &[]),
        5 => ("Redirect", &["Network", "Host", "TOS+Network", "TOS+Host"]),
        8 => ("EchoRequest", &[]),
        9 => ("RouterAdvertisement", &[]),
        10 => ("RouterSolicitation", &[]),
        11 => (
            "TimeExceeded",
            &["TTLExceeded", "FragmentReassemblyTimeExceeded"],
        ),
        12 => (
            "ParameterProblem",
            &["PointerIndicatesError", "MissingOption", "BadLength"],
        ),
        13 => ("Timestamp", &[]),
        14 => ("TimestampReply", &[]),
        15 => ("InfoRequest", &[]),
        16 => ("InfoReply", &[]),
        17 => ("AddressMaskRequest", &[]),
        18 => ("AddressMaskReply", &[]),
        _ => return format!("{icmp_type}({code})"),
    };
    match codes.get(usize::from(code)) {
        Some(code_name) => format!("{name}({code_name})"),
        None if codes.is_empty() && code == 0 => name.to_owned(),
        None => format!("{name}(Code: {code})"),
    }
}

/// gopacket's `ICMPv6TypeCode.String()` for the common types.
pub fn icmpv6_type_code(icmp_type: u8, code: u8) -> String {
    let name = match icmp_type {
        1 => "DestinationUnreachable",
        2 => "PacketTooBig",
        3 => "TimeExceeded",
        4 => "ParameterProblem",
        128 => "EchoRequest",
        129 => "EchoReply",
        133 => "RouterSolicitation",
        134 => "RouterAdvertisement",
        135 => "NeighborSolicitation",
        136 => "NeighborAdvertisement",
        137 => "Redirect",
        _ => return format!("{icmp_type}({code})"),
    };
    if code == 0 {
        name.to_owned()
    } else {
        format!("{name}(Code: {code})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(observation_point_by_name("to-endpoint"), Some(0));
        assert_eq!(observation_point_by_name("from-endpoint"), Some(5));
        assert_eq!(observation_point_by_name("nowhere"), None);
        assert_eq!(identity_by_name("world"), Some(2));
        assert_eq!(identity_by_name("reserved:host"), Some(1));
        assert_eq!(identity_by_name("16777217"), Some(16_777_217));
        assert_eq!(identity_by_name("nope"), None);
    }

    #[test]
    fn icmp_names_follow_gopacket() {
        assert_eq!(icmpv4_type_code(8, 0), "EchoRequest");
        assert_eq!(icmpv4_type_code(3, 3), "DestinationUnreachable(Port)");
        assert_eq!(icmpv4_type_code(200, 1), "200(1)");
        assert_eq!(icmpv6_type_code(128, 0), "EchoRequest");
    }

    #[test]
    fn drop_reasons_have_cilium_texts() {
        assert_eq!(drop_reason_display(133), "Policy denied");
        assert_eq!(drop_reason_display(181), "Policy denied by denylist");
        assert_eq!(drop_reason_display(178), "Socket lookup failed");
        assert_eq!(drop_reason_display(250), "250");
    }
}
