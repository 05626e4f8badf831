//! `proxy_get_property`: Envoy's attribute tree with Envoy's value encodings (strings raw,
//! ints as 8-byte little-endian, maps as the pairs serialization), plus membrane's peer
//! attributes.
//!
//! | path | type | source |
//! |---|---|---|
//! | `plugin_name`, `plugin_root_id`, `plugin_vm_id` | string | filter spec |
//! | `request.path` (with query), `.url_path`, `.query`, `.host`, `.scheme`, `.method` | string | request pseudo-headers |
//! | `request.headers` (map, repeated values comma-joined; `request.headers.<name>` one value) | map / string | request headers |
//! | `request.id`, `.useragent`, `.referer` | string | `x-request-id`, `user-agent`, `referer` |
//! | `request.protocol` | string | stream info |
//! | `response.code` | int | `:status` |
//! | `response.headers` (+ `.<name>`) | map / string | response headers |
//! | `source.address`, `destination.address` | string `ip:port` | stream info |
//! | `source.port`, `destination.port` | int | stream info |
//! | `source.identity`, `destination.identity` | uint (8-byte LE) | security identity |
//! | `source.labels`, `destination.labels` (+ `.<key>`) | map / string | identity labels |
//! | `source.namespace`, `.workload`, `.principal` (and destination) | string | endpoint |
//! | `connection.id` | uint | stream info |
//! | `membrane.source.*`, `membrane.destination.*` | | aliases (collision-proof names) |
//!
//! Anything else: values stored with `proxy_set_property` on the stream (or instance), else
//! NOT_FOUND.

use crate::abi::{encode_pairs, status};
use crate::state::HostState;
use crate::types::{Headers, PeerInfo};

pub(crate) fn get(state: &HostState, path: &[&[u8]], raw_path: &[u8]) -> Result<Vec<u8>, u32> {
    if let Some(v) = lookup(state, path) {
        return Ok(v);
    }
    let raw = raw_path.strip_suffix(&[0]).unwrap_or(raw_path);
    if let Some(stream) = state.stream()
        && let Some(v) = stream.own.properties.get(raw)
    {
        return Ok(v.clone());
    }
    state
        .root_properties
        .get(raw)
        .cloned()
        .ok_or(status::NOT_FOUND)
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn uint(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn lookup(state: &HostState, path: &[&[u8]]) -> Option<Vec<u8>> {
    let settings = &state.settings;
    match path {
        [b"plugin_name"] => Some(settings.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => Some(settings.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => Some(settings.vm_id.as_bytes().to_vec()),
        [b"membrane", rest @ ..] if matches!(rest.first(), Some(&b"source" | &b"destination")) => {
            lookup(state, rest)
        }
        [b"request", rest @ ..] => {
            let stream = state.stream()?;
            request(
                &stream.shared.request_headers,
                stream.shared.info.protocol.as_deref(),
                rest,
            )
        }
        [b"response", rest @ ..] => {
            let headers = &state.stream()?.shared.response_headers;
            match rest {
                [b"code"] => {
                    let code: i64 = headers.get_str(":status")?.parse().ok()?;
                    Some(int(code))
                }
                [b"headers"] => Some(map(headers.joined())),
                [b"headers", name] => headers.get(name).map(<[u8]>::to_vec),
                _ => None,
            }
        }
        [b"source", rest @ ..] => peer(&state.stream()?.shared.info.source, rest),
        [b"destination", rest @ ..] => peer(&state.stream()?.shared.info.destination, rest),
        [b"connection", b"id"] => state.stream()?.shared.info.connection_id.map(uint),
        _ => None,
    }
}

fn map(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    encode_pairs(pairs.iter().map(|(k, v)| (k, v)))
}

fn request(headers: &Headers, protocol: Option<&str>, rest: &[&[u8]]) -> Option<Vec<u8>> {
    let path = || headers.get(":path");
    let value = match rest {
        [b"path"] => path()?.to_vec(),
        [b"url_path"] => {
            let p = path()?;
            p.split(|b| *b == b'?').next().unwrap_or(p).to_vec()
        }
        [b"query"] => {
            let p = path()?;
            let at = p.iter().position(|b| *b == b'?')?;
            p[at + 1..].to_vec()
        }
        [b"host"] => headers.get(":authority")?.to_vec(),
        [b"scheme"] => headers.get(":scheme")?.to_vec(),
        [b"method"] => headers.get(":method")?.to_vec(),
        [b"headers"] => map(headers.joined()),
        [b"headers", name] => headers.get(name)?.to_vec(),
        [b"id"] => headers.get("x-request-id")?.to_vec(),
        [b"useragent"] => headers.get("user-agent")?.to_vec(),
        [b"referer"] => headers.get("referer")?.to_vec(),
        [b"protocol"] => protocol?.as_bytes().to_vec(),
        _ => return None,
    };
    Some(value)
}

fn peer(peer: &PeerInfo, rest: &[&[u8]]) -> Option<Vec<u8>> {
    let value = match rest {
        [b"address"] => peer.address?.to_string().into_bytes(),
        [b"port"] => int(i64::from(peer.address?.port())),
        [b"identity"] => uint(peer.identity?),
        [b"labels"] => encode_pairs(peer.labels.iter().map(|(k, v)| (k, v))),
        [b"labels", key] => peer
            .labels
            .iter()
            .find(|(k, _)| k.as_bytes() == *key)?
            .1
            .clone()
            .into_bytes(),
        [b"namespace"] => peer.namespace.clone()?.into_bytes(),
        [b"workload"] => peer.workload.clone()?.into_bytes(),
        [b"principal"] => peer.principal.clone()?.into_bytes(),
        _ => return None,
    };
    Some(value)
}
