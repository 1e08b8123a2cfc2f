//! Without the `etcd` feature the controller has no shared store, and the
//! replica tests (tests/fleet/replicas.rs) are not built: say so.

#[test]
fn controller_replicas_on_etcd() {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs the tests with --features etcd"
    );
    eprintln!("skipped: built without the etcd feature (cargo test --features etcd, with protoc installed)");
}
