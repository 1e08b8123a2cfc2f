//! Static files served by the node: index, types, validators, ranges, and
//! no way out of the root.

use crate::support::*;
use http::StatusCode;

const CONFIG: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
path = "/assets/"
static = { root = "public/assets" }
[[listener.route]]
path = "/"
static = { root = "public" }
"#;

fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[
            ("public/index.html", b"<h1>home</h1>"),
            ("public/docs/index.html", b"<h1>docs</h1>"),
            ("public/assets/app.js", b"console.log(1)"),
            ("public/data.bin", &[7u8; 1000]),
            ("secret.txt", b"outside the root"),
        ],
    );
    std::os::unix::fs::symlink(
        dir.path().join("secret.txt"),
        dir.path().join("public/escape.txt"),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn serves_index_and_content_types_with_prefix_stripped() {
    let node = LocalNode::start_in(site(), CONFIG).await;
    let web = node.listener("web").await;
    let client = http1_client();
    let home = get(&client, web, None, "/").await;
    assert_eq!(
        (home.status, home.text().as_str()),
        (StatusCode::OK, "<h1>home</h1>")
    );
    assert_eq!(
        home.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let js = get(&client, web, None, "/assets/app.js").await;
    assert_eq!(js.text(), "console.log(1)");
    assert!(js.header("content-type").unwrap().contains("javascript"));
    let docs = get(&client, web, None, "/docs").await;
    assert_eq!(docs.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(docs.header("location"), Some("/docs/"));
    assert_eq!(
        get(&client, web, None, "/docs/").await.text(),
        "<h1>docs</h1>"
    );
    assert_eq!(
        get(&client, web, None, "/missing.txt").await.status,
        StatusCode::NOT_FOUND
    );
    let head = get_with(&client, web, None, "/data.bin", &[])
        .await
        .unwrap();
    assert_eq!(head.header("content-length"), Some("1000"));
}

#[tokio::test]
async fn etag_and_last_modified_give_304() {
    let node = LocalNode::start_in(site(), CONFIG).await;
    let web = node.listener("web").await;
    let client = http1_client();
    let first = get(&client, web, None, "/index.html").await;
    let etag = first.header("etag").unwrap().to_owned();
    let modified = first.header("last-modified").unwrap().to_owned();
    let again = get_with(
        &client,
        web,
        None,
        "/index.html",
        &[("if-none-match", &etag)],
    )
    .await
    .unwrap();
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    let again = get_with(
        &client,
        web,
        None,
        "/index.html",
        &[("if-modified-since", &modified)],
    )
    .await
    .unwrap();
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let changed = get_with(
        &client,
        web,
        None,
        "/index.html",
        &[("if-none-match", "\"other\"")],
    )
    .await
    .unwrap();
    assert_eq!(changed.status, StatusCode::OK);
}

#[tokio::test]
async fn byte_ranges_give_206_and_416() {
    let node = LocalNode::start_in(site(), CONFIG).await;
    let web = node.listener("web").await;
    let client = http1_client();
    let part = get_with(&client, web, None, "/data.bin", &[("range", "bytes=10-19")])
        .await
        .unwrap();
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(part.body.len(), 10);
    let tail = get_with(&client, web, None, "/data.bin", &[("range", "bytes=-100")])
        .await
        .unwrap();
    assert_eq!(tail.header("content-range"), Some("bytes 900-999/1000"));
    assert_eq!(tail.body.len(), 100);
    let beyond = get_with(&client, web, None, "/data.bin", &[("range", "bytes=5000-")])
        .await
        .unwrap();
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.header("content-range"), Some("bytes */1000"));
}

#[tokio::test]
async fn nothing_outside_the_root_is_served() {
    let node = LocalNode::start_in(site(), CONFIG).await;
    let web = node.listener("web").await;
    for attempt in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2fsecret.txt",
        "/docs/..%2f..%2fsecret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
    ] {
        let request = format!("GET {attempt} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(web, request.as_bytes(), std::time::Duration::from_secs(2)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 403") || answer.starts_with("HTTP/1.1 400"),
            "{attempt}: {answer}"
        );
        assert!(!answer.contains("outside the root"), "{attempt}");
    }
    let escape = get(&http1_client(), web, None, "/escape.txt").await;
    assert_eq!(
        escape.status,
        StatusCode::FORBIDDEN,
        "a symlink out of the root is refused"
    );
    assert!(!escape.text().contains("outside the root"));
}

#[tokio::test]
async fn only_get_and_head() {
    let node = LocalNode::start_in(site(), CONFIG).await;
    let web = node.listener("web").await;
    let answer = raw_exchange(
        web,
        b"POST /index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 405"), "{answer}");
    assert!(answer.contains("allow: get, head"));
    let head = raw_exchange(
        web,
        b"HEAD /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 200")
            && head.contains("content-length: 13")
            && head.ends_with("\r\n\r\n"),
        "{head}"
    );
}
