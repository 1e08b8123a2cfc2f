//! Generated code for the `tether.v1` wire contract (`proto/`).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tether.v1");
}

/// Encoded descriptors of every tether .proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tether_descriptor.bin"));
