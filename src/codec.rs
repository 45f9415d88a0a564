//! The protobuf codec of the generated services (`codec_path` in `build.rs`): tonic-prost's
//! encoder, and a decoder that calls a message which does not decode what it is, the caller's
//! fault. tonic-prost maps every decode error (truncated fields, invalid UTF-8 in a string,
//! nesting past prost's recursion limit of 100, ...) to INTERNAL, which means a bug; here it
//! is `INVALID_ARGUMENT` with prost's description of the field that failed.
//!
//! The generated clients share the codec, so a Rust client of this crate reports an
//! undecodable response the same way.

use std::{collections::HashMap, marker::PhantomData};

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, DecodeBuf},
};
use tonic_types::{ErrorDetails, StatusExt as _};

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes `U`; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|err| decode_error(&err))
    }
}

/// The status of a message that does not decode: what
/// `GatewayError::invalid("request", ..)` gives (a test keeps them equal), built here
/// because the generated code below every other module uses this codec.
pub fn decode_error(err: &prost::DecodeError) -> Status {
    let description = format!("is not a valid protobuf message: {err}");
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation("request", description.clone());
    details.set_error_info("INVALID_ARGUMENT", "llmgateway", HashMap::new());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: request: {description}"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::pb;

    fn decode(bytes: &[u8]) -> Result<pb::ChatRequest, Status> {
        pb::ChatRequest::decode(bytes).map_err(|e| decode_error(&e))
    }

    #[test]
    fn the_status_is_the_gateway_errors() {
        let err = pb::ChatRequest::decode(&[0x0f][..]).unwrap_err();
        let ours = decode_error(&err);
        let gateway = crate::error::GatewayError::invalid(
            "request",
            format!("is not a valid protobuf message: {err}"),
        )
        .into_status();
        assert_eq!(ours.code(), gateway.code());
        assert_eq!(ours.message(), gateway.message());
        assert_eq!(ours.details(), gateway.details());
    }

    #[test]
    fn bad_bytes_are_the_callers_fault() {
        // Field 1 (model), length 2, not UTF-8.
        let status = decode(&[0x0a, 0x02, 0xff, 0xfe]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("UTF-8"), "{}", status.message());
        // A length past the end.
        let status = decode(&[0x0a, 0x7f, b'a']).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // A wire type that does not exist.
        let status = decode(&[0x0f]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
