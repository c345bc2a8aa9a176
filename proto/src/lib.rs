//! The gRPC contract between SNAPS sites and the global snapshot controller
//! (`proto/snaps/v1/snaps.proto`), compiled in pure Rust by `protox`, and the
//! conversions between its messages and the types of `snaps-schema` (values,
//! rows) and `snaps-mapping` (expressions, mapped queries).
//!
//! Both controllers use these conversions, so the wire form of a value or a
//! query is defined once.

pub mod convert;
pub mod deflate;
pub mod tls;

/// Generated messages, client and server of package `snaps.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("snaps.v1");
}

pub use convert::{
    WireError, compact_shapes, decode_expr, decode_rows, decode_value, encode_expr, encode_rows,
    encode_value, fetch_request, group_digest, shape_of, shape_of_relation,
};
