//! AWS wire helpers for testing the Bedrock dialect, written from the specifications and
//! independent of the AWS crates the orchestrator uses, so a test checks the client against the
//! protocol rather than against the library it is built on.
//!
//! - [`frame`] and its wrappers encode `application/vnd.amazon.eventstream` frames (the scripted
//!   LLM speaks them; unit tests turn the decoded fixtures back into wire bytes with
//!   [`jsonl_to_eventstream`]).
//! - [`verify_sigv4`] recomputes a Signature Version 4 request signature (canonical request,
//!   string to sign, HMAC key chain) and says why it does not match.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Event-stream frames

/// Header value type 7: a UTF-8 string with a 2-byte length.
const HEADER_TYPE_STRING: u8 = 7;

/// One event-stream frame with string headers, in the order given:
/// `total length | headers length | prelude CRC | headers | payload | message CRC`, big-endian,
/// both CRCs CRC-32 (IEEE), the second over everything before it.
pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut encoded_headers = Vec::new();
    for (name, value) in headers {
        let name_len = u8::try_from(name.len()).expect("header names are at most 255 bytes");
        let value_len = u16::try_from(value.len()).expect("header values are at most 65535 bytes");
        encoded_headers.push(name_len);
        encoded_headers.extend_from_slice(name.as_bytes());
        encoded_headers.push(HEADER_TYPE_STRING);
        encoded_headers.extend_from_slice(&value_len.to_be_bytes());
        encoded_headers.extend_from_slice(value.as_bytes());
    }
    let total = 12 + encoded_headers.len() + payload.len() + 4;
    let total = u32::try_from(total).expect("frames are at most 4 GiB");
    let headers_len = u32::try_from(encoded_headers.len()).expect("headers fit a frame");
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&headers_len.to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&encoded_headers);
    out.extend_from_slice(payload);
    let message_crc = crc32fast::hash(&out);
    out.extend_from_slice(&message_crc.to_be_bytes());
    out
}

/// An `event` frame with headers in the order AWS sends them.
pub fn event_frame(event_type: &str, payload: &Value) -> Vec<u8> {
    frame(
        &[(":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")],
        payload.to_string().as_bytes(),
    )
}

/// An `exception` frame (a modeled error sent after the stream began), e.g.
/// `throttlingException` with `{"message": "..."}`.
pub fn exception_frame(exception_type: &str, payload: &Value) -> Vec<u8> {
    frame(
        &[(":exception-type", exception_type), (":content-type", "application/json"), (":message-type", "exception")],
        payload.to_string().as_bytes(),
    )
}

/// An `error` frame (an unmodeled error): the code and message travel in headers.
pub fn error_frame(code: &str, message: &str) -> Vec<u8> {
    frame(&[(":error-code", code), (":error-message", message), (":message-type", "error")], b"")
}

/// Wire bytes for a decoded Converse stream: each line `{"<eventType>": payload}` becomes an
/// event frame carrying `payload`.
pub fn jsonl_to_eventstream(jsonl: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).expect("fixture line is JSON");
        let (event_type, payload) =
            value.as_object().and_then(|o| o.iter().next()).expect("fixture line is a one-key object");
        out.extend(event_frame(event_type, payload));
    }
    out
}

/// One decoded frame: its string headers in order, and its payload.
pub type Frame = (Vec<(String, String)>, Vec<u8>);

/// The frames of an event-stream body, CRCs checked. For tests of what the scripted LLM sends;
/// panics on anything malformed.
pub fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let total = be32(bytes);
        let headers_len = be32(&bytes[4..]);
        assert_eq!(be32(&bytes[8..]), crc32fast::hash(&bytes[..8]) as usize, "prelude CRC");
        assert_eq!(be32(&bytes[total - 4..]), crc32fast::hash(&bytes[..total - 4]) as usize, "message CRC");
        let mut headers = Vec::new();
        let mut h = &bytes[12..12 + headers_len];
        while !h.is_empty() {
            let name_len = h[0] as usize;
            let name = String::from_utf8(h[1..1 + name_len].to_vec()).expect("UTF-8 header name");
            assert_eq!(h[1 + name_len], HEADER_TYPE_STRING, "string header");
            let value_len = u16::from_be_bytes([h[2 + name_len], h[3 + name_len]]) as usize;
            let value = String::from_utf8(h[4 + name_len..4 + name_len + value_len].to_vec()).expect("UTF-8 value");
            headers.push((name, value));
            h = &h[4 + name_len + value_len..];
        }
        frames.push((headers, bytes[12 + headers_len..total - 4].to_vec()));
        bytes = &bytes[total..];
    }
    frames
}

// ---------------------------------------------------------------------------------------------
// Signature Version 4

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far the request time may be from now; AWS allows 5 minutes, a test machine is generous.
const MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;
/// Headers every Bedrock request must sign.
const REQUIRED_SIGNED: &[&str] = &["content-type", "host", "x-amz-content-sha256", "x-amz-date"];

/// What a SigV4 check expects of a request.
#[derive(Debug, Clone)]
pub struct SigV4Expect<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

/// Checks a request's `Authorization` signature. `path_and_query` is the request target exactly
/// as sent (still percent-encoded); `headers` have lower-case names. `Err` says what is wrong.
pub fn verify_sigv4(
    method: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
    expect: &SigV4Expect<'_>,
) -> Result<(), String> {
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let authorization = header("authorization").ok_or("no authorization header")?;
    let fields = authorization.strip_prefix(ALGORITHM).ok_or("authorization is not AWS4-HMAC-SHA256")?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for field in fields.split(',') {
        match field.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(format!("unexpected authorization field {field:?}")),
        }
    }
    let (credential, signed_headers, signature) = match (credential, signed_headers, signature) {
        (Some(c), Some(h), Some(s)) => (c, h, s),
        _ => return Err(format!("incomplete authorization: {authorization}")),
    };

    let amz_date = header("x-amz-date").ok_or("no x-amz-date header")?;
    let time = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|e| format!("bad x-amz-date {amz_date:?}: {e}"))?
        .and_utc();
    let skew = (chrono::Utc::now() - time).num_seconds().abs();
    if skew > MAX_CLOCK_SKEW_SECS {
        return Err(format!("x-amz-date {amz_date} is {skew}s away from now"));
    }
    let date = &amz_date[..8];
    let scope = format!("{date}/{}/{}/aws4_request", expect.region, expect.service);
    if credential != format!("{}/{scope}", expect.access_key_id) {
        return Err(format!("credential {credential:?} is not {}/{scope}", expect.access_key_id));
    }

    let body_hash = hex::encode(Sha256::digest(body));
    if header("x-amz-content-sha256") != Some(body_hash.as_str()) {
        return Err("x-amz-content-sha256 is not the SHA-256 of the body".to_string());
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    if names.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("signed headers are not sorted and unique: {signed_headers}"));
    }
    let mut required: Vec<&str> = REQUIRED_SIGNED.to_vec();
    if header("x-amz-security-token").is_some() {
        required.push("x-amz-security-token");
    }
    if let Some(missing) = required.iter().find(|r| !names.contains(r)) {
        return Err(format!("{missing} is not signed ({signed_headers})"));
    }

    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let mut canonical = format!("{method}\n{}\n{}\n", uri_encode(path, false), canonical_query(query));
    for name in &names {
        let values: Vec<String> = headers.iter().filter(|(n, _)| n == name).map(|(_, v)| collapse_spaces(v)).collect();
        if values.is_empty() {
            return Err(format!("signed header {name} is not in the request"));
        }
        let _ = writeln!(canonical, "{name}:{}", values.join(","));
    }
    let _ = write!(canonical, "\n{signed_headers}\n{body_hash}");

    let string_to_sign = format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(&canonical)));
    let k_date = hmac(format!("AWS4{}", expect.secret_access_key).as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, expect.region.as_bytes());
    let k_service = hmac(&k_region, expect.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let expected = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    if expected != signature {
        return Err(format!("signature mismatch; canonical request was:\n{canonical}"));
    }
    Ok(())
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters stay, everything else is `%XX`
/// (upper-case). Applied to a path that is already encoded, this is the double encoding every
/// service but S3 expects (`%3A` becomes `%253A`).
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            b'/' if !encode_slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(k, true), uri_encode(v, true))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

fn collapse_spaces(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `get-vanilla` example of the AWS SigV4 test suite, with its published signature.
    #[test]
    fn signature_of_the_aws_example() {
        let k_date = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20150830");
        let k_signing = hmac(&hmac(&hmac(&k_date, b"us-east-1"), b"service"), b"aws4_request");
        let canonical = "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let string_to_sign = format!(
            "{ALGORITHM}\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n{}",
            hex::encode(Sha256::digest(canonical))
        );
        assert_eq!(
            hex::encode(hmac(&k_signing, string_to_sign.as_bytes())),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn paths_are_encoded_again() {
        assert_eq!(
            uri_encode("/model/anthropic.claude-v2%3A1/converse-stream", false),
            "/model/anthropic.claude-v2%253A1/converse-stream"
        );
        assert_eq!(canonical_query("b=2&a=x y"), "a=x%20y&b=2");
    }

    #[test]
    fn frames_carry_valid_crcs() {
        let bytes = frame(&[(":message-type", "event")], b"{}");
        assert_eq!(u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize, bytes.len());
        assert_eq!(u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")), crc32fast::hash(&bytes[..8]));
        let end = bytes.len() - 4;
        assert_eq!(u32::from_be_bytes(bytes[end..].try_into().expect("4 bytes")), crc32fast::hash(&bytes[..end]));
    }

    /// The encoder reproduces a recorded frame byte for byte (its headers in the order given).
    #[test]
    fn frames_match_a_recorded_one() {
        let path =
            format!("{}/fixtures/providers/bedrock/stream_error_exception.eventstream", env!("CARGO_MANIFEST_DIR"));
        let recorded = std::fs::read(&path).expect("fixture");
        let payload = br#"{"contentBlockIndex":0,"delta":{"text":"before error"}}"#;
        let headers =
            [(":message-type", "event"), (":event-type", "contentBlockDelta"), (":content-type", "application/json")];
        let encoded = frame(&headers, payload);
        assert_eq!(encoded, recorded[..encoded.len()]);
    }
}
