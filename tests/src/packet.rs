//! Crafted Ethernet/IPv4 frames for `BPF_PROG_TEST_RUN` tests.
//!
//! Checksums are filled in (the programs do not verify them, but a frame that a real stack
//! would reject makes a misleading test input).

use std::net::Ipv4Addr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A frame under construction: what goes into the IPv4 header.
#[derive(Clone, Debug)]
pub struct Ipv4Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Flags + fragment offset field, host order (0x2000 = MF).
    pub frag: u16,
    pub payload: Vec<u8>,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Ipv4Frame {
    /// Ethernet + IPv4 (20-byte header) + payload.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(34 + self.payload.len());
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst mac
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src mac
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = 20 + self.payload.len() as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.protocol;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&self.payload);
        f
    }
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> u16 {
    let mut p = Vec::with_capacity(12 + l4.len());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(protocol);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(l4);
    checksum(&p)
}

/// A TCP segment with `flags` and no payload.
pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = pseudo_sum(src.0, dst.0, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    Ipv4Frame {
        src: src.0,
        dst: dst.0,
        protocol: 6,
        frag: 0,
        payload: t.to_vec(),
    }
    .build()
}

/// A UDP datagram carrying `data`.
pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&src.1.to_be_bytes());
    u.extend_from_slice(&dst.1.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let c = pseudo_sum(src.0, dst.0, 17, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    Ipv4Frame {
        src: src.0,
        dst: dst.0,
        protocol: 17,
        frag: 0,
        payload: u,
    }
    .build()
}

/// An ICMP message of `icmp_type` (code 0) with identifier `id` and sequence 1.
pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m[0] = icmp_type;
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&1u16.to_be_bytes());
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Ipv4Frame {
        src,
        dst,
        protocol: 1,
        frag: 0,
        payload: m,
    }
    .build()
}

/// An Ethernet frame of another EtherType with a zero payload.
pub fn ethertype(ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.resize(14 + payload_len, 0);
    f
}
