//! The body type every HTTP message of the data path carries, whatever produced it (a downstream or upstream
//! connection of either HTTP version, a buffered body for retries, a local reply).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}
