//! Property tests, bounded in cases so that CI runs them in seconds.
//!
//! - Every generated config (valid, near-valid, extreme values) that
//!   `tether check` accepts starts a real node in-process, which serves a
//!   request on each listener and reloads without a panic anywhere.
//! - The config parser, destination names, SOCKS5 and forward-proxy
//!   requests never panic on arbitrary input, and the node survives them.
//! - The controller's store, damaged anywhere, opens with a prefix of what
//!   was written or refuses to open: it never shows wrong data.
//!
//! `PROPTEST_CASES` raises the number of cases for a longer search.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;
use tether::config::{Config, ListenAddr, Protocol};
use tether::controller::store::{Damaged, Record, Store, StoredNode};
use tether::proxy::Destination;
use tether::supervisor::{self, ApplySource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Panics on the threads of the runtimes that run nodes under test (a
/// panicking connection task would otherwise go unnoticed), counted by a
/// hook. Panics in a test's own closure are caught by proptest itself.
static PANICS: AtomicUsize = AtomicUsize::new(0);
const NODE_THREADS: &str = "node-under-test";

fn node_runtime() -> tokio::runtime::Runtime {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with(NODE_THREADS)) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(NODE_THREADS)
        .enable_all()
        .build()
        .unwrap()
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Shrinking restarts nodes many times; the first failure is enough.
        max_shrink_iters: 32,
        // A failure prints its minimal input; the tree stays clean.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- configs ----

/// Durations: mostly ordinary, sometimes at or past the limits.
fn duration() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        7 => select(vec!["50ms", "2s", "1h", "24h"]),
        1 => select(vec![
            "0s",
            "1ms",
            "25h",
            "86401s",
            "18446744073709551615s",
            "18446744073709551615h",
            "5x",
        ]),
    ]
}

/// Numbers: mostly from `ordinary`, sometimes at or past every limit.
fn number(ordinary: &[i64]) -> impl Strategy<Value = i64> {
    prop_oneof![
        7 => select(ordinary.to_vec()),
        1 => select(vec![
            -1,
            0,
            1,
            100,
            101,
            1000,
            1001,
            8191,
            8192,
            1_048_576,
            1_048_577,
            42_949_672,
            4_294_967_295,
            4_294_967_296,
        ]),
    ]
}

/// `key = value` lines, each present a third of the time.
fn optional(
    key: &'static str,
    value: impl Strategy<Value = String> + 'static,
) -> BoxedStrategy<String> {
    proptest::option::weighted(0.35, value)
        .prop_map(move |v| v.map_or(String::new(), |v| format!("{key} = {v}\n")))
        .boxed()
}

fn quoted(value: impl Strategy<Value = &'static str>) -> impl Strategy<Value = String> {
    value.prop_map(|v| format!("{v:?}"))
}

fn listener(index: usize) -> impl Strategy<Value = String> {
    (
        prop_oneof![
            12 => select(vec!["http", "http", "tcp", "forward", "socks5"]),
            1 => Just("bogus"),
        ],
        optional("header_read_timeout", quoted(duration())),
        optional(
            "max_header_bytes",
            number(&[8192, 65536]).prop_map(|n| n.to_string()),
        ),
        optional("idle_timeout", quoted(duration())),
        optional("via", any::<bool>().prop_map(|b| b.to_string())),
        optional("connect_timeout", quoted(duration())),
    )
        .prop_map(move |(protocol, read, header, idle, via, connect)| {
            // idle_timeout on an HTTP listener is refused: rarely, then.
            let idle = if protocol == "http" && !via.is_empty() {
                String::new()
            } else {
                idle
            };
            let body = match protocol {
                "http" | "bogus" => "[[listener.route]]\nupstream = \"u\"\n".to_owned(),
                "tcp" => "upstream = \"u\"\n".to_owned(),
                _ => format!("[listener.proxy]\nallow = [\"127.0.0.1\"]\n{connect}"),
            };
            format!(
                "[[listener]]\nname = \"l{index}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n{read}{header}{idle}{via}{body}"
            )
        })
}

fn upstream() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(number(&[1, 2, 5]), 1..4),
        prop_oneof![
            12 => select(vec![
                "round_robin",
                "weighted_round_robin",
                "least_conn",
                "consistent_hash",
                "power_of_two",
            ]),
            1 => Just("fastest"),
        ],
        prop_oneof![
            12 => select(vec!["client_ip", "header:x-user"]),
            1 => select(vec!["header:", "cookie"]),
        ],
        optional("retries", number(&[0, 1, 2]).prop_map(|n| n.to_string())),
        optional(
            "max_idle_per_server",
            number(&[0, 16, 512]).prop_map(|n| n.to_string()),
        ),
        (
            optional("connect_timeout", quoted(duration())),
            optional("read_timeout", quoted(duration())),
            optional("idle_timeout", quoted(duration())),
        ),
        proptest::option::weighted(0.4, (
            select(vec!["tcp", "http"]),
            quoted(duration()),
            quoted(duration()),
            number(&[1, 2, 3]),
            number(&[1, 2, 3]),
        )),
        proptest::option::weighted(0.4, (
            number(&[1, 5]),
            quoted(duration()),
            quoted(duration()),
            number(&[0, 50, 100]),
        )),
    )
        .prop_map(
            |(weights, balance, hash_on, retries, idle, (connect, read, pool_idle), health, passive)| {
                // hash_on goes with consistent_hash (and, rarely, without).
                let hash_on = if balance == "consistent_hash" || retries.contains('0') {
                    format!("hash_on = {hash_on:?}\n")
                } else {
                    String::new()
                };
                // Servers nobody listens on: connections are refused at once.
                let servers: Vec<String> = weights
                    .iter()
                    .enumerate()
                    .map(|(i, w)| format!("{{ addr = \"127.0.0.1:{}\", weight = {w} }}", i + 1))
                    .collect();
                let mut text = format!(
                    "[upstream.u]\nservers = [{}]\nbalance = \"{balance}\"\n{hash_on}{retries}{idle}{connect}{read}{pool_idle}",
                    servers.join(", ")
                );
                if let Some((kind, interval, timeout, rise, fall)) = health {
                    text += &format!("[upstream.u.health]\ntype = \"{kind}\"\ninterval = {interval}\ntimeout = {timeout}\nrise = {rise}\nfall = {fall}\n");
                }
                if let Some((failures, ejection, max_ejection, percent)) = passive {
                    text += &format!("[upstream.u.passive]\nconsecutive_failures = {failures}\nejection = {ejection}\nmax_ejection = {max_ejection}\nmax_ejected_percent = {percent}\n");
                }
                text
            },
        )
}

fn config() -> impl Strategy<Value = String> {
    (
        optional("drain_timeout", quoted(duration())),
        listener(0),
        proptest::option::of(listener(1)),
        upstream(),
    )
        .prop_map(|(drain, first, second, upstream)| {
            format!(
                "[node]\n{drain}\n{first}\n{}\n{upstream}",
                second.unwrap_or_default()
            )
        })
}

/// What a client does on one listener: a request, or a few bytes.
async fn touch(protocol: Protocol, addr: SocketAddr) {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        panic!("listener {addr} does not accept");
    };
    let hello: &[u8] = match protocol {
        Protocol::Http | Protocol::Https => {
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        }
        Protocol::Forward => b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
        Protocol::Socks5 => b"\x05\x01\x00",
        Protocol::Tcp => b"hello",
        // Not a TLS ClientHello: refused by the handshake.
        Protocol::Tunnel => b"hello",
    };
    let _ = stream.write_all(hello).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut answer)).await;
}

/// Starts a node on `text` in-process, touches every listener, reloads,
/// stops.
async fn run_node(dir: &std::path::Path, text: &str) {
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    let node = supervisor::start(Some(path), ApplySource::File)
        .await
        .unwrap_or_else(|e| panic!("an accepted config did not start: {e}\n{text}"));
    let generation = node.current().expect("a generation in force");
    for listener in &generation.listeners {
        if let ListenAddr::Tcp(addr) = listener.bound {
            touch(listener.config.protocol, addr).await;
        }
    }
    node.apply(ApplySource::File)
        .await
        .unwrap_or_else(|e| panic!("an accepted config did not reload: {e}\n{text}"));
    node.stop(Some(Duration::ZERO)).await;
    tokio::time::timeout(Duration::from_secs(5), node.stopped())
        .await
        .expect("the node stops");
}

#[test]
fn every_config_check_accepts_runs_serves_and_reloads_without_a_panic() {
    let runtime = node_runtime();
    let dir = tempfile::tempdir().unwrap();
    let accepted = AtomicUsize::new(0);
    proptest!(cases(96), |(text in config())| {
        let before = PANICS.load(Ordering::SeqCst);
        let checked = Config::parse(&text, dir.path());
        if std::env::var_os("SHOW_REFUSALS").is_some() {
            if let Err(errors) = &checked {
                eprintln!("{}", errors[0]);
            }
        }
        if checked.is_ok() {
            accepted.fetch_add(1, Ordering::Relaxed);
            runtime.block_on(run_node(dir.path(), &text));
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a panic with:\n{}", text);
    });
    // The generator must reach the node, not only the parser.
    let accepted = accepted.load(Ordering::Relaxed);
    eprintln!("{accepted} generated configs were accepted and run");
    // About a third are accepted; far fewer means the generator drifted.
    assert!(accepted >= 10, "too few accepted configs: {accepted}");
}

#[test]
fn the_config_parser_never_panics() {
    let valid = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n[[listener.route]]\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"10.0.0.1:80\", weight = 2 }]\n[upstream.u.health]\ntype = \"http\"\n";
    proptest!(cases(512), |(
        noise in "\\PC{0,80}",
        at in 0..valid.len(),
        cut in 0..20usize,
    )| {
        // Arbitrary text, and a valid config with text spliced in or cut out.
        let mut spliced = valid.to_owned();
        let at = (0..=at).rev().find(|i| spliced.is_char_boundary(*i)).unwrap_or(0);
        spliced.insert_str(at, &noise);
        let end = (at + cut).min(valid.len());
        let mut cut_out = valid.to_owned();
        if valid.is_char_boundary(end) {
            cut_out.replace_range(at..end, "");
        }
        for text in [&noise, &spliced, &cut_out] {
            let _ = Config::parse_portable(text);
        }
    });
}

#[test]
fn destination_names_normalize_once_and_never_panic() {
    proptest!(cases(1024), |(host in "\\PC{0,40}|[A-Za-z0-9.\\-\\[\\]:]{0,40}", port in any::<u16>())| {
        if let Some(Destination::Name(name, _)) = Destination::parse(&host, port) {
            prop_assert!(!name.ends_with('.'));
            prop_assert_eq!(name.to_ascii_lowercase(), name.clone());
            prop_assert_eq!(
                Destination::parse(&name, port),
                Some(Destination::Name(name.clone(), port))
            );
        }
    });
}

/// A node with a SOCKS5 and a forward listener, both allowed only to
/// loopback.
async fn proxies() -> (
    supervisor::NodeHandle,
    tempfile::TempDir,
    SocketAddr,
    SocketAddr,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"socks\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"socks5\"\n[listener.proxy]\nallow = [\"127.0.0.1\"]\n\
         [[listener]]\nname = \"forward\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"forward\"\n[listener.proxy]\nallow = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    let node = supervisor::start(Some(path), ApplySource::File)
        .await
        .unwrap();
    let generation = node.current().unwrap();
    let addr = |i: usize| match generation.listeners[i].bound {
        ListenAddr::Tcp(addr) => addr,
        ListenAddr::Unix(_) => unreachable!(),
    };
    let (socks, forward) = (addr(0), addr(1));
    (node, dir, socks, forward)
}

/// Sends `bytes` and reads what comes back until close or a short wait;
/// `then_close`: ends the sending half right after.
async fn exchange(addr: SocketAddr, bytes: &[u8], then_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    if then_close {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(300), stream.read_to_end(&mut answer)).await;
    answer
}

#[test]
fn socks5_and_forward_requests_of_any_shape_cost_only_their_connection() {
    let runtime = node_runtime();
    let (node, _dir, socks, forward) = runtime.block_on(proxies());
    let socks5_like = (
        Just(vec![5u8]),
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(a, b, c)| [a, b, c].concat());
    let request_line = (
        select(vec!["CONNECT", "GET", "POST", "connect", ""]),
        "[ -~]{0,60}",
        select(vec![" HTTP/1.1", " HTTP/1.0", " HTTP/2", "", " HTTP/1.1 x"]),
        "([A-Za-z-]{1,12}: [ -~]{0,30}\r\n){0,3}",
    )
        .prop_map(|(method, target, version, headers)| {
            format!("{method} {target}{version}\r\n{headers}\r\n").into_bytes()
        });
    let before = PANICS.load(Ordering::SeqCst);
    proptest!(cases(128), |(
        socks_bytes in prop_oneof![socks5_like, proptest::collection::vec(any::<u8>(), 0..64)],
        forward_bytes in request_line,
    )| {
        runtime.block_on(async {
            exchange(socks, &socks_bytes, true).await;
            exchange(forward, &forward_bytes, true).await;
        });
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before);
    });
    // Both still serve a well-formed client.
    runtime.block_on(async {
        let refused = exchange(
            forward,
            b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n",
            false,
        )
        .await;
        assert!(
            refused.starts_with(b"HTTP/1.1 403"),
            "{:?}",
            String::from_utf8_lossy(&refused)
        );
        let greeting = exchange(socks, &[5, 1, 0], false).await;
        assert_eq!(greeting.get(..2), Some(&[5u8, 0][..]));
        node.stop(Some(Duration::ZERO)).await;
    });
}

#[test]
fn a_damaged_store_opens_with_a_prefix_of_its_versions_or_not_at_all() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pristine = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let (store, _) = Store::open(pristine.path(), Damaged::Refuse).unwrap();
        for n in 1..=4 {
            store
                .append_durable(support::stored_version(n, &format!("# version {n}\n")))
                .await
                .unwrap();
            store
                .append_durable(Record::Node(StoredNode {
                    id: format!("node-{n}"),
                    version: n,
                    ..StoredNode::default()
                }))
                .await
                .unwrap();
        }
    });
    let log = std::fs::read(pristine.path().join("fleet.log")).unwrap();
    proptest!(cases(256), |(
        at in 0..log.len(),
        damage in prop_oneof![
            any::<u8>().prop_map(Some),
            Just(None),
        ],
        length in 1..40usize,
    )| {
        // Change one byte, or cut `length` bytes out, at `at`.
        let mut damaged = log.clone();
        match damage {
            Some(byte) => damaged[at] = byte,
            None => {
                let end = (at + length).min(damaged.len());
                damaged.drain(at..end);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fleet.log"), &damaged).unwrap();
        let opened = runtime.block_on(async { Store::open(dir.path(), Damaged::Refuse) });
        if let Ok((_, loaded)) = opened {
            let numbers: Vec<u64> = loaded.versions.iter().map(|v| v.version).collect();
            let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
            prop_assert_eq!(&numbers, &expected);
            for version in &loaded.versions {
                prop_assert_eq!(&version.config, &format!("# version {}\n", version.version));
            }
            for (id, node) in &loaded.nodes {
                prop_assert_eq!(id, &format!("node-{}", node.version));
            }
        }
    });
}

/// Found by the config property: `stopped()` called after the node had
/// finished stopping waited forever.
#[tokio::test]
async fn stopped_resolves_when_asked_after_the_node_has_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"u\"\n[upstream.u]\nservers = [{ addr = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let node = supervisor::start(Some(path), ApplySource::File)
        .await
        .unwrap();
    node.stop(Some(Duration::ZERO)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(5), node.stopped())
        .await
        .expect("stopped() resolves");
}
