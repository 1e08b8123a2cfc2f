//! `tether check`: exit 0 and a summary for a good config; exit 1 and every
//! error with its line:column and key path for a bad one.

use std::process::Command;

fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr)
        .replace(&format!("{}:", path.display()), "node.toml:");
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn the_shipped_example_is_valid() {
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "check",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/node.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout)
        .contains("ok: 2 listeners, 3 routes, 1 upstream (1 server)"));
}

#[test]
fn a_good_config_gets_a_summary() {
    let (code, stdout, _) = check(
        r#"
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
[[listener.route]]
upstream = "api"
[[listener.route]]
path = "/static/"
static = { root = "site" }
[upstream.api]
servers = [{ addr = "10.0.0.1:80" }, { addr = "10.0.0.2:80", weight = 3 }]
balance = "weighted_round_robin"
"#,
    );
    assert_eq!(code, 0);
    assert!(
        stdout.ends_with("ok: 1 listener, 2 routes, 1 upstream (2 servers)\n"),
        "{stdout}"
    );
}

#[test]
fn every_error_is_reported_with_its_location() {
    let (code, _, stderr) = check(
        r#"[node]
drain_timeout = "30"

[[listener]]
name = "web"
listen = "127.0.0.1:99999"
[[listener.route]]
path = "api"
upstream = "missing"

[[listener]]
name = "web2"
listen = "127.0.0.1:8081"
protcol = "http"

[upstream.api]
servers = [{ addr = "10.0.0.1:80" }, { addr = "10.0.0.1:99999" }]
"#,
    );
    assert_eq!(code, 1);
    let expected = [
        "node.toml:2:17: node.drain_timeout: invalid duration \"30\"",
        "node.toml:6:10: listener[0].listen: invalid socket address \"127.0.0.1:99999\"",
        "node.toml:8:8: listener[0].route[0].path: path \"api\" must start with \"/\"",
        "node.toml:9:12: listener[0].route[0].upstream: no upstream named \"missing\"",
        "node.toml:14:1: listener[1].protcol: unknown field `protcol`",
        "node.toml:17:47: upstream.api.servers[1].addr: invalid socket address \"10.0.0.1:99999\"",
    ];
    for line in expected {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(stderr.contains("6 errors"), "{stderr}");
}

#[test]
fn syntax_errors_and_unknown_sections_are_located() {
    let (code, _, stderr) = check("[[listener]\nname = \"x\"\n");
    assert_eq!(code, 1);
    assert!(stderr.starts_with("node.toml:1:"), "{stderr}");
    let (code, _, stderr) = check("[listeners]\nname = \"x\"\n");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("node.toml:1:1: listeners: unknown section `listeners`"),
        "{stderr}"
    );
}

#[test]
fn semantic_mistakes_are_explained() {
    let (code, _, stderr) = check(
        r#"
[control]
listen = "0.0.0.0:8837"
[[listener]]
name = "a"
listen = "127.0.0.1:8080"
[[listener.route]]
upstream = "u"
static = { root = "site" }
[[listener]]
name = "a"
listen = "127.0.0.1:8080"
[[listener.route]]
static = { root = "no-such-dir" }
[upstream.u]
servers = []
balance = "consistent_hash"
"#,
    );
    assert_eq!(code, 1);
    for fragment in [
        "control.listen: control listen address 0.0.0.0:8837 is not loopback",
        "listener[0].route[0]: a route has either `upstream` or `static`, not both",
        "listener[1].name: listener name \"a\" is used twice",
        "listener[1].listen: address 127.0.0.1:8080 is used by another listener",
        "listener[1].route[0].static.root: cannot open static root",
        "upstream.u.servers: an upstream needs at least one server",
        "upstream.u.balance: consistent_hash needs `hash_on",
    ] {
        assert!(
            stderr.contains(fragment),
            "missing {fragment:?} in:\n{stderr}"
        );
    }
}
