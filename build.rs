//! Compiles the wire contract in `proto/` with a pure-Rust protobuf compiler,
//! so a fresh checkout builds with `cargo build` and no system `protoc`.
//! The same descriptor set is written to OUT_DIR for gRPC server reflection.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/tether/v1/control.proto",
    "proto/tether/v1/controller.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tether_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // One buffer per published version, shared by every node's stream.
        .bytes(".tether.v1.Push.config")
        .compile_fds(descriptors)?;
    Ok(())
}
