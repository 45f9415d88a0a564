//! Compiles the protos in `proto/` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and writes the descriptor set that gRPC reflection serves.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

const PROTO_DIR: &str = "proto/llmgateway/v1";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut protos: Vec<PathBuf> = fs::read_dir(PROTO_DIR)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort();
    let fds = protox::compile(&protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("llmgateway_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".llmgateway.v1.Image.data")
        // Undecodable requests are INVALID_ARGUMENT, not tonic-prost's INTERNAL.
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
