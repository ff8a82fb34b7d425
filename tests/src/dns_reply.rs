//! The reply of the testbed's name servers (the cluster DNS of the real control plane's tests,
//! `mesh-probe dns-serve` of the netns ones): a query read, answered as a lookup says.

use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Message, MessageType, Metadata, ResponseCode},
    rr::{rdata::A, RData, Record, RecordType},
};

/// What a name server knows of a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    /// Not its to answer: `REFUSED`.
    Refused,
    /// No such name: `NXDOMAIN`.
    NoSuchName,
    /// These IPv4 addresses (an `A` query's answer; other types get none).
    Addresses(Vec<Ipv4Addr>),
}

/// The reply to the query in `packet`, with `ttl`, from what `lookup` knows of the name (lower
/// case, without the final dot) for the query's type; `None` for what is no query (nothing is
/// sent back).
pub fn reply(
    packet: &[u8],
    ttl: u32,
    lookup: impl FnOnce(&str, RecordType) -> Known,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.authoritative = true;
    let Some(query) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.queries.push(query.clone());
    let name = query.name().to_lowercase().to_ascii();
    match lookup(name.trim_end_matches('.'), query.query_type()) {
        Known::Refused => response.metadata.response_code = ResponseCode::Refused,
        Known::NoSuchName => response.metadata.response_code = ResponseCode::NXDomain,
        Known::Addresses(ips) => {
            if query.query_type() == RecordType::A {
                for ip in ips {
                    response.answers.push(Record::from_rdata(
                        query.name().clone(),
                        ttl,
                        RData::A(A(ip)),
                    ));
                }
            }
        }
    }
    response.to_vec().ok()
}
