//! Generated protobuf and gRPC code for `llmgateway.v1`, and the descriptor set that gRPC
//! reflection serves. Lints are relaxed here only, because the code is generated.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("llmgateway.v1");

/// The encoded `FileDescriptorSet` of every proto in `proto/` (with imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/llmgateway_descriptor.bin"));
