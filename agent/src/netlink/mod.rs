//! Links, addresses, routes and neighbours through rtnetlink, synchronously (the CNI
//! plugin has no async runtime): one request at a time on a socket of the calling
//! thread's network namespace, each acknowledged, the kernel's error turned into one
//! that names the operation and the object. To work in a pod's namespace, open the
//! [`Netlink`] on a thread that has entered it (see `host::netns::in_netns`).
//!
//! `link.rs` has links (veth pairs, the VXLAN device), `route.rs` addresses, routes
//! and neighbours of both IP families; both build messages and read dumps into
//! small typed structs.
mod link;
mod route;

use std::{fmt, io};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

pub use link::{Link, Veth};
pub use route::{
    Address, Address6, AddressOf, IpEncap, Neighbour, Neighbour6, NeighbourOf, NetlinkFamily,
    Route, Route6, RouteOf, RouteScope,
};

/// A failed netlink request: which operation on which object, and the kernel's errno
/// (with its extended-ack message when it sent one).
#[derive(Debug)]
pub struct Error {
    operation: &'static str,
    object: String,
    source: io::Error,
    kernel_message: Option<String>,
}

impl Error {
    /// `operation` on `object` failed with `source` (and the kernel's own text).
    fn of(
        operation: &'static str,
        object: &str,
        source: io::Error,
        kernel_message: Option<String>,
    ) -> Self {
        Self {
            operation,
            object: object.to_string(),
            source,
            kernel_message,
        }
    }

    /// An answer of a kind the request does not expect.
    fn unexpected(operation: &'static str, object: &str) -> Self {
        let source = io::Error::new(io::ErrorKind::InvalidData, "unexpected answer");
        Self::of(operation, object, source, None)
    }

    /// The errno the kernel answered (or the socket failed) with.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The kernel has no such object (ENOENT).
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "netlink {} {}: {}",
            self.operation, self.object, self.source
        )?;
        if let Some(message) = &self.kernel_message {
            write!(f, " ({message})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The name of a request's message type, for errors.
fn operation(message: &RouteNetlinkMessage) -> &'static str {
    use RouteNetlinkMessage as M;
    match message {
        M::NewLink(_) => "RTM_NEWLINK",
        M::DelLink(_) => "RTM_DELLINK",
        M::GetLink(_) => "RTM_GETLINK",
        M::SetLink(_) => "RTM_SETLINK",
        M::NewAddress(_) => "RTM_NEWADDR",
        M::DelAddress(_) => "RTM_DELADDR",
        M::GetAddress(_) => "RTM_GETADDR",
        M::NewRoute(_) => "RTM_NEWROUTE",
        M::DelRoute(_) => "RTM_DELROUTE",
        M::GetRoute(_) => "RTM_GETROUTE",
        M::NewNeighbour(_) => "RTM_NEWNEIGH",
        M::DelNeighbour(_) => "RTM_DELNEIGH",
        M::GetNeighbour(_) => "RTM_GETNEIGH",
        _ => "request",
    }
}

/// Big enough for any one datagram the kernel sends on a route socket (a dump part
/// is at most 32 KiB; a single link's message is far smaller).
const RECEIVE_BUFFER: usize = 64 * 1024;
/// A dump the kernel marks interrupted (the table changed meanwhile) is retried.
const DUMP_ATTEMPTS: usize = 5;
/// `NLMSGERR_ATTR_MSG`: the extended ack's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A route netlink socket of the calling thread's network namespace.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Self> {
        let failed = |source| Error {
            operation: "socket",
            object: "NETLINK_ROUTE".into(),
            source,
            kernel_message: None,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(failed)?;
        socket.bind_auto().map_err(failed)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(failed)?;
        // Errors carry the kernel's own text and not a copy of the whole request.
        socket.set_ext_ack(true).map_err(failed)?;
        socket.set_cap_ack(true).map_err(failed)?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; RECEIVE_BUFFER],
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), message.into());
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.sequence)
    }

    /// Receive the answers to request `sequence` and hand each to `on_message` until
    /// it returns `Some` (the final answer: an ack, error or end of dump).
    fn receive<T>(
        &mut self,
        sequence: u32,
        mut on_message: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Option<T>,
    ) -> io::Result<T> {
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut datagram = &self.buffer[..size.min(self.buffer.len())];
            while !datagram.is_empty() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(datagram)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = (message.header.length as usize).max(16);
                datagram = datagram
                    .get(length.next_multiple_of(4)..)
                    .unwrap_or_default();
                // Answers to an earlier request that gave up are not this one's.
                if message.header.sequence_number != sequence {
                    continue;
                }
                if let Some(done) = on_message(message) {
                    return Ok(done);
                }
            }
        }
    }

    /// Send `message` (with `flags` besides REQUEST|ACK) and wait for its ack; the
    /// kernel's error names `object`. Answers other than the ack (an echo) are ignored.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16, object: &str) -> Result<()> {
        let operation = operation(&message);
        let fail = |source, kernel_message| Error::of(operation, object, source, kernel_message);
        let sequence = self
            .send(message, flags | NLM_F_ACK)
            .map_err(|e| fail(e, None))?;
        let answer = self
            .receive(sequence, |message| match message.payload {
                NetlinkPayload::Error(error) => Some(acknowledgement(&message.header, &error)),
                _ => None,
            })
            .map_err(|e| fail(e, None))?;
        answer.map_err(|(source, text)| fail(source, text))
    }

    /// Send `message` (a GET of one object) and return the kernel's answer.
    fn get(&mut self, message: RouteNetlinkMessage, object: &str) -> Result<RouteNetlinkMessage> {
        let operation = operation(&message);
        let fail = |source, kernel_message| Error::of(operation, object, source, kernel_message);
        let sequence = self.send(message, 0).map_err(|e| fail(e, None))?;
        let answer = self
            .receive(sequence, |message| match message.payload {
                NetlinkPayload::InnerMessage(inner) => Some(Ok(inner)),
                NetlinkPayload::Error(error) => {
                    Some(match acknowledgement(&message.header, &error) {
                        Ok(()) => Err((io::Error::from(io::ErrorKind::UnexpectedEof), None)),
                        Err(e) => Err(e),
                    })
                }
                _ => None,
            })
            .map_err(|e| fail(e, None))?;
        answer.map_err(|(source, text)| fail(source, text))
    }

    /// Dump every object `message` asks for (all parts, up to NLMSG_DONE); a dump the
    /// kernel marks interrupted is taken again.
    fn dump(
        &mut self,
        message: RouteNetlinkMessage,
        object: &str,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let operation = operation(&message);
        let fail = |source, kernel_message| Error::of(operation, object, source, kernel_message);
        for _ in 0..DUMP_ATTEMPTS {
            let sequence = self
                .send(message.clone(), NLM_F_DUMP)
                .map_err(|e| fail(e, None))?;
            let mut parts = Vec::new();
            let mut interrupted = false;
            let end = self
                .receive(sequence, |answer| {
                    interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                    match answer.payload {
                        NetlinkPayload::InnerMessage(inner) => {
                            parts.push(inner);
                            None
                        }
                        NetlinkPayload::Done(_) => Some(Ok(())),
                        NetlinkPayload::Error(error) => {
                            Some(acknowledgement(&answer.header, &error))
                        }
                        _ => None,
                    }
                })
                .map_err(|e| fail(e, None))?;
            end.map_err(|(source, text)| fail(source, text))?;
            if !interrupted {
                return Ok(parts);
            }
        }
        Err(fail(io::Error::from_raw_os_error(nix::libc::EINTR), None))
    }
}

/// An NLMSG_ERROR answer: code 0 is the ack, else the errno and the extended ack's
/// message when the kernel attached one.
fn acknowledgement(
    header: &NetlinkHeader,
    error: &netlink_packet_core::ErrorMessage,
) -> std::result::Result<(), (io::Error, Option<String>)> {
    match error.code {
        None => Ok(()),
        Some(code) => {
            let text = (header.flags & NLM_F_ACK_TLVS != 0)
                .then(|| extended_ack_message(&error.header))
                .flatten();
            Err((io::Error::from_raw_os_error(code.get().abs()), text))
        }
    }
}

/// The NLMSGERR_ATTR_MSG text after the echoed request header (the socket caps the
/// echo at the 16-byte header).
fn extended_ack_message(payload: &[u8]) -> Option<String> {
    let mut attributes = payload.get(16..)?;
    while attributes.len() >= 4 {
        let length = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        let value = attributes.get(4..length.max(4))?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        attributes = attributes
            .get(length.next_multiple_of(4)..)
            .unwrap_or_default();
    }
    None
}

/// A MAC as `ip` shows it: `0a:58:0a:f4:00:02`.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_operation_the_object_and_the_errno() {
        let error = Error {
            operation: "RTM_NEWLINK",
            object: "veth fer1234 <-> eth0".into(),
            source: io::Error::from_raw_os_error(17),
            kernel_message: None,
        };
        assert_eq!(
            error.to_string(),
            "netlink RTM_NEWLINK veth fer1234 <-> eth0: File exists (os error 17)"
        );
        assert_eq!(error.errno(), Some(17));
    }

    #[test]
    fn the_extended_ack_message_follows_the_echoed_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Unknown device type\0";
        let length = 4 + text.len();
        payload.extend((length as u16).to_ne_bytes());
        payload.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend(text);
        payload.resize(payload.len().next_multiple_of(4), 0);
        assert_eq!(
            extended_ack_message(&payload).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(extended_ack_message(&payload[..16]), None);
        assert_eq!(extended_ack_message(&[0; 8]), None, "short payload");
        // A truncated attribute is not read past the end.
        assert_eq!(extended_ack_message(&payload[..24]), None);
    }
}
