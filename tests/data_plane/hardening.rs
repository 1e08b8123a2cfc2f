//! A node under hostile or careless clients: connections that send
//! nothing, malformed bodies that must not be blamed on a server, headers
//! and targets that must be read the way RFC 9110/9112 say, and the
//! descriptor budget running out.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn proxy_config(header_read_timeout: &str, upstream: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"{header_read_timeout}\"\n[[listener.route]]\nupstream = \"u\"\n{upstream}"
    )
}

fn one_server(origin: &Origin) -> String {
    format!(
        "[upstream.u]\nservers = [{{ addr = \"{}\" }}]\n",
        origin.addr
    )
}

/// Waits until the peer closes `stream` (EOF or reset); answers how long
/// that took, or `None` if it was still open after `within`.
async fn closed_within(
    stream: &mut (impl AsyncReadExt + Unpin),
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn connections_that_send_nothing_or_stall_before_a_request_are_closed() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&proxy_config("1s", &one_server(&origin))).await;
    let web = node.listener("web").await;

    // Nothing at all: hyper-util waits for the first bytes to choose a
    // protocol, and nothing bounded that wait.
    let mut silent = TcpStream::connect(web).await.unwrap();
    // Part of the HTTP/2 preface, then nothing.
    let mut half_preface = TcpStream::connect(web).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The whole preface, and no SETTINGS.
    let mut preface_only = TcpStream::connect(web).await.unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();

    for (what, stream) in [
        ("a silent connection", &mut silent),
        ("half an HTTP/2 preface", &mut half_preface),
        ("a preface without SETTINGS", &mut preface_only),
    ] {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "{what} was still open after 5 s");
    }
    // A real client is served all along.
    let answer = get(&http1_client(), web, None, "/").await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn an_https_connection_that_sends_nothing_after_the_handshake_is_closed() {
    let ca = TestCa::new("test ca");
    let issued = ca.issue(&["localhost"]);
    let origin = Origin::start("o").await;
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[
            ("cert.pem", issued.cert_pem.as_bytes()),
            ("key.pem", issued.key_pem.as_bytes()),
        ],
    );
    let config = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\nheader_read_timeout = \"1s\"\n[[listener.tls.certificate]]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[[listener.route]]\nupstream = \"u\"\n{}",
        one_server(&origin)
    );
    let node = LocalNode::start_in(dir, &config).await;
    let web = node.listener("web").await;
    let mut tls = tls_connect(web, "localhost", &ca.pem(), &[b"http/1.1"]).await;
    let closed = closed_within(&mut tls, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "a TLS connection with no request stayed open"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_after_the_timeout() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&proxy_config("1s", &one_server(&origin))).await;
    let web = node.listener("web").await;
    let stream = TcpStream::connect(web).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{web}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // The node closes the idle connection; the client's driver ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_400_and_ejects_no_server() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let node = LocalNode::start(&proxy_config(
        "5s",
        &format!(
            "[upstream.u]\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}]\n[upstream.u.passive]\nconsecutive_failures = 3\n",
            a.addr, b.addr
        ),
    )).await;
    let web = node.listener("web").await;
    for _ in 0..6 {
        let answer = raw_exchange(
            web,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            Duration::from_secs(3),
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    let client = http1_client();
    for _ in 0..4 {
        assert_eq!(get(&client, web, None, "/").await.status, 200);
    }
    for origin in [&a, &b] {
        let health = node.server_health("u", &origin.addr.to_string()).await;
        assert_ne!(health, tether::proto::v1::HealthState::Unhealthy);
    }
}

/// An origin that speaks HTTP/1.0: answers every request with a body and
/// closes the connection.
async fn http10_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_node_answers_http11_clients_in_http11_behind_an_http10_origin() {
    let origin = http10_origin().await;
    let node = LocalNode::start(&proxy_config(
        "5s",
        &format!("[upstream.u]\nservers = [{{ addr = \"{origin}\" }}]\n"),
    ))
    .await;
    let web = node.listener("web").await;
    let mut stream = TcpStream::connect(web).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("old"), "{answer}");
    }
}

/// Reads one chunked or Content-Length response from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if head.contains("chunked") && body.ends_with("0\r\n\r\n") {
                // Keep only the data of the (single) chunk.
                let data = body.split("\r\n").nth(1).unwrap_or_default();
                return format!("{head}\r\n\r\n{data}");
            }
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|l| l.trim().parse::<usize>().ok());
            if length.is_some_and(|l| body.len() >= l) {
                return text;
            }
        }
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            read > 0,
            "closed after {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..read]);
    }
}

#[tokio::test]
async fn every_x_forwarded_for_line_reaches_the_upstream_as_one_list() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&proxy_config("5s", &one_server(&origin))).await;
    let web = node.listener("web").await;
    let answer = raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.1\r\nX-Forwarded-For: 198.51.100.2, 192.0.2.3\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let seen = origin.seen().pop().unwrap();
    let values: Vec<&str> = seen
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(values, ["203.0.113.1, 198.51.100.2, 192.0.2.3, 127.0.0.1"]);
}

#[tokio::test]
async fn an_absolute_form_target_is_routed_by_its_authority_not_by_host() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nhost = \"a.example\"\nupstream = \"a\"\n[[listener.route]]\nhost = \"b.example\"\nupstream = \"b\"\n[upstream.a]\nservers = [{{ addr = \"{}\" }}]\n[upstream.b]\nservers = [{{ addr = \"{}\" }}]\n",
        a.addr, b.addr
    )).await;
    let web = node.listener("web").await;
    let answer = raw_exchange(
        web,
        b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("x-origin: a"), "{answer}");
    let seen = a.seen().pop().expect("origin a saw the request");
    assert_eq!(seen.headers["host"], "a.example");
    assert_eq!(seen.uri.path(), "/x");
    assert_eq!(b.requests(), 0);
}

#[tokio::test]
async fn out_of_descriptors_the_node_keeps_serving_open_connections_and_logs_once_a_second() {
    let origin = Origin::start("o").await;
    let node = Node::start_customized(&proxy_config("2s", &one_server(&origin)), |command| {
        // SAFETY: setrlimit in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 96,
                    rlim_max: 96,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let web = node.listener("web").await;
    // A keep-alive connection opened before the descriptors run out.
    let mut kept = TcpStream::connect(web).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..150 {
        if let Ok(stream) = TcpStream::connect(web).await {
            flood.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let failures_logged = node.log_lines_with("accept failed");
    assert!(
        failures_logged >= 1,
        "the node never said it ran out of descriptors"
    );
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        (failures_logged as f64) <= seconds + 2.0,
        "{failures_logged} accept-failure lines in {seconds:.1} s"
    );
    // The open connection still works.
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    // The idle flood is closed after header_read_timeout, and new
    // connections are accepted again.
    drop(kept);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            get_with(&http1_client(), web, None, "/", &[]),
        )
        .await;
        if matches!(answer, Ok(Ok(ref a)) if a.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new connections were never served again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(flood);
}

/// An origin that streams `chunks` chunks, one every 200 ms.
async fn trickling_origin(chunks: usize) -> SocketAddr {
    use http_body_util::StreamBody;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| async move {
                    let ticks = futures_util::stream::unfold(0, move |sent| async move {
                        if sent == chunks {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let frame = hyper::body::Frame::data(bytes::Bytes::from_static(b"tick\n"));
                        Some((Ok::<_, std::convert::Infallible>(frame), sent + 1))
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(ticks)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// Idleness is no request open, and a request is open until its response
/// body ends: a download that outlasts header_read_timeout many times over
/// is never cut, over HTTP/1.1 or HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_download_is_not_an_idle_connection() {
    let origin = trickling_origin(20).await;
    let node = LocalNode::start(&proxy_config(
        "500ms",
        &format!("[upstream.u]\nservers = [{{ addr = \"{origin}\" }}]\n"),
    ))
    .await;
    let web = node.listener("web").await;
    for client in [http1_client(), http2_client()] {
        let answer = get(&client, web, None, "/").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 20 * 5, "the whole 4 s download arrived");
    }
}
