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

#[test]
fn a_bad_value_does_not_hide_the_other_errors_of_its_entry() {
    let (code, _, stderr) = check(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
header_read_timeout = "soon"
[[listener.route]]
upstream = "api"

[[listener]]
name = "secure"
listen = "127.0.0.1:8443"
protocol = "https"
[listener.tls]
min_version = "1.1"
[[listener.tls.certificate]]
cert = "missing.crt"
key = "missing.key"
[[listener.route]]
upstream = "api"

[upstream.api]
balance = "fastest"
servers = [{ addr = "10.0.0.1:80", weight = 0 }, { addr = "10.0.0.2:80", weight = -1 }]
connect_timeout = "5x"
"#,
    );
    assert_eq!(code, 1);
    for fragment in [
        "node.toml:4:23: listener[0].header_read_timeout: invalid duration \"soon\"",
        "listener[1].tls.min_version: invalid TLS version \"1.1\"",
        "listener[1].tls.certificate[0].cert: cannot read",
        "listener[1].tls.certificate[0].key: cannot read",
        "node.toml:21:11: upstream.api.balance: unknown variant `fastest`",
        "upstream.api.servers[0].weight: 0 is out of range: write 1 to 1000",
        "upstream.api.servers[1].weight: invalid value: integer `-1`",
        "upstream.api.connect_timeout: invalid duration \"5x\"",
    ] {
        assert!(
            stderr.contains(fragment),
            "missing {fragment:?} in:\n{stderr}"
        );
    }
}

/// Every number has a documented range; values past it would have crashed
/// or exhausted a running node (timers past the clock's end, a hash ring
/// of billions of points, HTTP/2 header limits that wrap).
#[test]
fn numbers_outside_their_documented_ranges_are_refused() {
    let (code, _, stderr) = check(
        r#"[node]
workers = 0

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
header_read_timeout = "18446744073709551615s"
max_header_bytes = 4294967296
[[listener.route]]
upstream = "ring"

[[listener]]
name = "tcp"
listen = "127.0.0.1:9000"
protocol = "tcp"
upstream = "ring"
idle_timeout = "18446744073709551615s"

[[listener]]
name = "egress"
listen = "127.0.0.1:3128"
protocol = "forward"
idle_timeout = "0s"
[listener.proxy]
connect_timeout = "25h"

[upstream.ring]
balance = "consistent_hash"
hash_on = "client_ip"
servers = [{ addr = "10.0.0.1:80", weight = 42949672 }, { addr = "10.0.0.2:80", weight = 1000 }]
idle_timeout = "18446744073709551615h"
retries = 4000000000
max_idle_per_server = 10000000
[upstream.ring.health]
type = "tcp"
rise = 1000
[upstream.ring.passive]
consecutive_failures = 0
max_ejected_percent = 101
"#,
    );
    assert_eq!(code, 1);
    for fragment in [
        "node.workers: 0 is out of range: write 1 to 1024",
        "listener[0].header_read_timeout: duration \"18446744073709551615s\" is too long: at most 24h",
        "listener[0].max_header_bytes: 4294967296 is out of range: write 8192 to 1048576",
        "listener[1].idle_timeout: duration \"18446744073709551615s\" is too long",
        "listener[2].idle_timeout: must be more than 0",
        "listener[2].proxy.connect_timeout: duration \"25h\" is too long",
        "upstream.ring.servers[0].weight: 42949672 is out of range: write 1 to 1000",
        "upstream.ring.idle_timeout: duration \"18446744073709551615h\" is too long",
        "upstream.ring.retries: 4000000000 is out of range: write 0 to 10",
        "upstream.ring.max_idle_per_server: 10000000 is out of range: write 0 to 65536",
        "upstream.ring.health.rise: 1000 is out of range: write 1 to 100",
        "upstream.ring.passive.consecutive_failures: 0 is out of range: write 1 to 1000",
        "upstream.ring.passive.max_ejected_percent: 101 is out of range: write 0 to 100",
    ] {
        assert!(stderr.contains(fragment), "missing {fragment:?} in:\n{stderr}");
    }

    // Weights in range that still make too large a ring.
    let servers: Vec<String> = (1..=11)
        .map(|i| format!("{{ addr = \"10.0.0.{i}:80\", weight = 1000 }}"))
        .collect();
    let (code, _, stderr) = check(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nupstream = \"ring\"\n[upstream.ring]\nbalance = \"consistent_hash\"\nhash_on = \"client_ip\"\nservers = [{}]\n",
        servers.join(", ")
    ));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("upstream.ring.servers: consistent_hash: the servers' weights add up to 11000, at most 10000"),
        "{stderr}"
    );
}

#[test]
fn idle_timeout_is_accepted_on_forward_and_socks5_listeners_only_off_http() {
    let (code, stdout, stderr) = check(
        r#"[[listener]]
name = "egress"
listen = "127.0.0.1:3128"
protocol = "forward"
idle_timeout = "30s"
[[listener]]
name = "socks"
listen = "127.0.0.1:1080"
protocol = "socks5"
idle_timeout = "45s"
"#,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, _, stderr) = check(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nidle_timeout = \"30s\"\n[[listener.route]]\nstatic = { root = \"site\" }\n",
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "listener[0].idle_timeout: `idle_timeout` applies to tcp, forward and socks5 listeners"
        ),
        "{stderr}"
    );
}

#[test]
fn a_plaintext_controller_url_off_loopback_needs_insecure() {
    let controller = |url: &str, extra: &str| {
        check(&format!(
            "[controller]\nurl = \"{url}\"\nstate_dir = \"state\"\n{extra}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nstatic = {{ root = \"site\" }}\n"
        ))
    };
    let (code, _, stderr) = controller("http://192.0.2.99:8840", "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("node.toml:2:7: controller.url: a plaintext controller url must be on loopback, and 192.0.2.99 is not"),
        "{stderr}"
    );
    for url in [
        "http://127.0.0.1:8840",
        "http://localhost:8840",
        "http://[::1]:8840",
    ] {
        let (code, _, stderr) = controller(url, "");
        assert_eq!(code, 0, "{url}: {stderr}");
    }
    let (code, _, stderr) = controller("http://192.0.2.99:8840", "insecure = true");
    assert_eq!(code, 0, "{stderr}");
    // Answer counts go to the controller at most ten times a second.
    let (code, _, stderr) = controller("http://127.0.0.1:8840", "report_interval = \"50ms\"");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("controller.report_interval: at least 100ms"),
        "{stderr}"
    );
    let (code, _, stderr) = controller("http://127.0.0.1:8840", "report_interval = \"1s\"");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn several_controller_urls_are_checked_each_with_its_place() {
    let with_urls = |urls: &str| {
        check(&format!(
            "[controller]\nurl = {urls}\nstate_dir = \"state\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nstatic = {{ root = \"site\" }}\n"
        ))
    };
    let (code, _, stderr) = with_urls(r#"["http://127.0.0.1:8840", "http://127.0.0.1:8841"]"#);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) =
        with_urls(r#"["http://127.0.0.1:8840", "http://192.0.2.9:8840", "ftp://x"]"#);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("controller.url[1]: a plaintext controller url must be on loopback")
            && stderr.contains("controller.url[2]: invalid controller url \"ftp://x\""),
        "{stderr}"
    );
    let (code, _, stderr) = with_urls("[]");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("controller.url: give at least one controller url"),
        "{stderr}"
    );
}

#[test]
fn tunnel_mistakes_are_each_reported_with_their_place() {
    let (code, _, stderr) = check(
        r#"[[listener]]
name = "tunnels"
listen = "127.0.0.1:7443"
protocol = "tunnel"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
[[listener.route]]
upstream = "nas"

[upstream.nas]
servers = [{ addr = "tunnel:nas/web" }, { addr = "tunnel:nas" }, { addr = "tunnel:n a/web" }]

[[tunnel]]
name = "home"
connect = "public.example"
connections = 0
[tunnel.tls]
ca = "ca.pem"
cert = "node.pem"
key = "node-key.pem"
"#,
    );
    assert_eq!(code, 1);
    for expected in [
        "listener[0].protocol: protocol = \"tunnel\" needs [listener.tls]",
        "listener[0].tunnel: protocol = \"tunnel\" needs [listener.tunnel] with client_ca",
        "upstream.nas.servers[0].addr: no tunnel listener expects service \"web\" from node \"nas\"",
        "upstream.nas.servers[1].addr: invalid tunnel address \"tunnel:nas\": write \"tunnel:NODE/SERVICE\"",
        "upstream.nas.servers[2].addr: invalid node id \"n a\"",
        "tunnel[0].connect: invalid address \"public.example\": write HOST:PORT",
        "tunnel[0].connections: 0 is out of range: write 1 to 16",
        "tunnel[0]: a tunnel needs at least one [[tunnel.service]]",
        "tunnel[0].tls.ca: cannot read",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

/// `tether check good.toml | head -0`: the reader is gone before the
/// summary is written. Like other Unix tools, the command ends quietly.
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nstatic = { root = \"site\" }\n",
    )
    .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check")
        .arg(&path)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}",
        output.status
    );
}
