//! Pieces for a call answered at the HTTP level rather than through tonic's
//! codec (the control plane's StreamLogs relay passes the host's frames on
//! as they come, without decoding them): the request (one small message)
//! read whole, a gRPC response, and the trailers that end it.

use bytes::{Buf, BufMut, Bytes};
use http_body::Frame;
use http_body_util::BodyExt as _;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

/// Largest request message accepted (the requests relayed are tens of
/// bytes).
const MAX_REQUEST: usize = 64 * 1024;
/// A gRPC message's prefix: the compressed flag and the length.
const PREFIX: usize = 5;

/// The body of a unary-request call: one length-prefixed, uncompressed
/// message, returned with its prefix (to be sent on as it came) and
/// without it.
pub async fn read_request(body: Body) -> Result<(Bytes, Bytes), Status> {
    let framed = http_body_util::Limited::new(body, MAX_REQUEST + PREFIX)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the request: {e}")))?
        .to_bytes();
    let mut rest = framed.clone();
    if rest.len() < PREFIX {
        return Err(Status::invalid_argument("the request has no message"));
    }
    let compressed = rest.get_u8();
    let len = rest.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted",
        ));
    }
    if len != rest.len() {
        return Err(Status::invalid_argument(
            "the request must hold exactly one message",
        ));
    }
    Ok((framed, rest))
}

/// `message` with its gRPC prefix (uncompressed): a request body to send on.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = bytes::BytesMut::with_capacity(PREFIX + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// A gRPC response (status 200) whose messages and trailers `body` gives.
pub fn response(body: Body) -> http::Response<Body> {
    let mut resp = http::Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The trailers that end a stream with `status`.
pub fn trailers(status: Status) -> Frame<Bytes> {
    let mut h = status.into_http::<()>().into_parts().0.headers;
    h.remove(http::header::CONTENT_TYPE);
    Frame::trailers(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &'static [u8]) -> Body {
        Body::new(http_body_util::Full::new(Bytes::from_static(b)))
    }

    /// One uncompressed message is returned with and without its prefix;
    /// anything else is refused before it is decoded or sent on.
    #[tokio::test]
    async fn a_request_is_exactly_one_uncompressed_message() {
        let (framed, msg) = read_request(body(b"\0\0\0\0\x03abc")).await.unwrap();
        assert_eq!(&framed[..], b"\0\0\0\0\x03abc");
        assert_eq!(&msg[..], b"abc");
        for (bad, code) in [
            (&b""[..], tonic::Code::InvalidArgument),
            (&b"\0\0\0\0\x03ab"[..], tonic::Code::InvalidArgument),
            (&b"\0\0\0\0\x01ab"[..], tonic::Code::InvalidArgument),
            (&b"\x01\0\0\0\x03abc"[..], tonic::Code::Unimplemented),
        ] {
            let e = read_request(body(bad)).await.unwrap_err();
            assert_eq!(e.code(), code, "{bad:?}: {e:?}");
        }
        let big: &'static [u8] = Box::leak(vec![0u8; MAX_REQUEST + PREFIX + 1].into_boxed_slice());
        assert!(read_request(body(big)).await.is_err());
    }
}
