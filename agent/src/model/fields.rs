//! Checks of object fields that every parser of the model shares.
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::namespace_of;
use crate::family::Family;

/// `Kind namespace/name` of an object, for the skipped list.
pub(super) fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        namespace_of(meta),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// A hostile value, shortened for a log line.
pub(super) fn truncated(value: &str) -> String {
    match value.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

pub(super) fn parse_ipv4(value: &str, field: &str) -> Result<Ipv4Addr, String> {
    parse_ip(value, field)
}

/// An address of family `A`.
pub(super) fn parse_ip<A: Family>(value: &str, field: &str) -> Result<A, String> {
    value
        .parse::<IpAddr>()
        .ok()
        .and_then(A::from_ip)
        .ok_or_else(|| {
            format!(
                "{field} {:?} is not an {} address",
                truncated(value),
                A::NAME
            )
        })
}

pub(super) fn valid_port(port: i32, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field} {port} is out of range 1-65535")),
    }
}
