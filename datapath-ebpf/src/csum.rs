//! Ones'-complement checksum arithmetic (RFC 1071, RFC 1624), with no packet access:
//! the bottom of the datapath's modules.

/// RFC 1624 incremental update of a ones'-complement checksum for a 32-bit field
/// change. Byte order does not matter as long as checksum and values share it (here:
/// network-order bytes read natively).
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let not_from = !from;
    let mut sum =
        (!check) as u32 + (not_from & 0xffff) + (not_from >> 16) + (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The Internet checksum of `bytes` (an even number of them).
#[inline(always)]
pub fn of_bytes(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
