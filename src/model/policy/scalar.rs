//! Scalar values of policy specs that are parsed at deserialization: [`IpBlock`] (an address
//! or CIDR) and [`PortNumber`], and `Parse`, the visitor every such scalar deserializes
//! through so that the YAML parser reports the offending scalar with its line.
//!
//! Owns: those values' parsing and text forms. Does not own: match patterns (`matching`),
//! the CRD shapes that hold them.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Deserializes a scalar through `FromStr`, failing inside the scalar's own deserialization
/// so the YAML parser marks the scalar itself (line and index) in the error. Numbers are
/// accepted as their decimal text (`- 8080` as well as `- "8080"`).
pub(super) struct Parse<T> {
    expecting: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> Parse<T> {
    pub(super) fn new(expecting: &'static str) -> Self {
        Parse {
            expecting,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for Parse<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

/// An IP address or CIDR from `ipBlocks` and friends; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock(pub IpNet);

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(IpBlock(net));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(IpBlock(IpNet::from(ip)));
        }
        Err(format!("invalid IP address or CIDR {s:?}"))
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Parse::<IpBlock>::new("an IP address or CIDR"))
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A TCP port from `ports`/`notPorts` (Istio writes them as strings; numbers are accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortNumber(pub u16);

impl FromStr for PortNumber {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u16>() {
            Ok(p) if p != 0 => Ok(PortNumber(p)),
            _ => Err(format!(
                "invalid port {s:?}: expected a number from 1 to 65535"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Parse::<PortNumber>::new("a port number"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks_accept_addresses_and_cidrs_only() {
        assert_eq!(
            "10.0.0.1".parse::<IpBlock>().unwrap().0.to_string(),
            "10.0.0.1/32"
        );
        assert!("10.0.0.0/8".parse::<IpBlock>().is_ok());
        assert!("fd00::/8".parse::<IpBlock>().is_ok());
        assert!("10.0.0.0/33".parse::<IpBlock>().is_err());
        assert!("banana".parse::<IpBlock>().is_err());
    }
}
