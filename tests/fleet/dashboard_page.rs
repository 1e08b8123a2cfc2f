//! The dashboard's page in a real headless Chromium: a real controller,
//! real nodes, the page kept current by its event stream, hostile text
//! shown as text, and an operator's rollback from the page.

use std::time::{Duration, Instant};

use crate::support::browser::{chromium, Browser};
use crate::support::*;

const XSS: &str = "<img src=x onerror=alert(1)>";

/// The row of node `id`, as the page's script finds it.
fn row(id: &str) -> String {
    format!(
        "[...document.querySelectorAll('#nodes tbody tr')].find(r => r.dataset.node === {})",
        serde_json::json!(id)
    )
}

/// Whether the element `id` is shown (not hidden, not display: none).
fn shown(id: &str) -> String {
    format!("(document.getElementById('{id}').offsetParent !== null)")
}

/// Where the screenshots go: the test target's own directory.
fn output(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_the_fleet_live_and_catches_up_after_a_restart() {
    let Some(chromium) = chromium() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let dashboard = free_addr();
    let dashboard_arg = dashboard.to_string();
    let mut controller = Controller::start(data.path(), &["--dashboard", &dashboard_arg]);
    let url = controller.url();
    let origin = Origin::start("app").await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    let hostile_label = format!(r#"env = "prod", team = "{XSS}""#);
    let a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    let hostile = Node::start(&node_config(XSS, &url, &hostile_label));
    wait_acked(&controller, &["a", "b", XSS], 1).await;

    let mut page = Browser::launch(&chromium);
    page.open(&format!("http://{dashboard}/"));
    page.wait_for(
        "three nodes on v1",
        "document.getElementById('headline').textContent === 'v1 on 3 of 3 nodes'",
        Duration::from_secs(10),
    );
    page.wait_for(
        "live",
        "document.getElementById('link').textContent === 'live'",
        Duration::from_secs(10),
    );
    // Without operator tokens the page is read-only: nobody can sign in.
    assert_eq!(page.eval(&shown("sign-in")), false);
    assert_eq!(
        page.eval("document.getElementById('operator').textContent"),
        "read-only"
    );
    for id in ["a", "b", XSS] {
        let state = page.eval(&format!("{}.dataset.state", row(id)));
        assert_eq!(state, "ok", "{id}");
    }

    // Hostile text is text: the id and the label read as written, and no
    // element or dialog came of them.
    let id_cell = page.eval(&format!("{}.querySelector('td.id').textContent", row(XSS)));
    assert_eq!(id_cell, XSS);
    let labels = page.eval(&format!(
        "{}.querySelector('td.labels').textContent",
        row(XSS)
    ));
    assert_eq!(labels, format!("env=prod team={XSS}"));
    assert_eq!(page.eval("document.querySelectorAll('img').length"), 0);

    // v2 listens on a Unix socket beside each node's config; on b something
    // already listens there. b's NACK reaches its row without a reload.
    let held = std::os::unix::net::UnixListener::bind(b.path("web.sock")).unwrap();
    controller
        .publish(&traffic("unix:web.sock", &origin), "")
        .await
        .unwrap();
    let published = Instant::now();
    let reason = page.wait_for(
        "b's NACK in its row",
        &format!(
            "{0}.dataset.state === 'nack' && {0}.querySelector('td.nack').innerText",
            row("b")
        ),
        Duration::from_secs(5),
    );
    let took = published.elapsed();
    // The reason, and the error with its place in the config.
    let reason = reason.as_str().unwrap();
    assert!(reason.starts_with("v2: cannot bind"), "{reason}");
    assert!(reason.contains("\nlistener[0].listen: "), "{reason}");
    assert!(
        took < Duration::from_secs(2),
        "the NACK took {took:?} to show"
    );
    page.wait_for(
        "a on v2",
        &format!(
            "{}.querySelector('td.version').textContent === 'v2'",
            row("a")
        ),
        Duration::from_secs(10),
    );

    // A node that dies turns disconnected.
    hostile.signal(libc::SIGKILL);
    page.wait_for(
        "the killed node disconnected",
        &format!("{}.dataset.state === 'disconnected'", row(XSS)),
        Duration::from_secs(30),
    );
    page.wait_for(
        "the headline counts it",
        "document.getElementById('headline').textContent.includes('1 disconnected')",
        Duration::from_secs(5),
    );
    page.screenshot(&output("fleet.png"));
    eprintln!("screenshot: {}", output("fleet.png").display());

    // The controller goes away: the page says it is reconnecting, then
    // catches up by itself with what happened meanwhile.
    controller.kill();
    page.wait_for(
        "reconnecting shown",
        "document.getElementById('link').textContent === 'reconnecting…'",
        Duration::from_secs(10),
    );
    drop(held);
    controller.restart();
    wait_connected(&controller, &["a", "b"]).await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    page.wait_for(
        "live again",
        "document.getElementById('link').textContent === 'live'",
        Duration::from_secs(15),
    );
    for id in ["a", "b"] {
        page.wait_for(
            &format!("{id} on v3 after the restart"),
            &format!(
                "{}.querySelector('td.version').textContent === 'v3'",
                row(id)
            ),
            Duration::from_secs(15),
        );
    }
    page.wait_for(
        "v3 in the history",
        "document.querySelector('#versions tbody tr').dataset.version === '3'",
        Duration::from_secs(5),
    );
    assert_eq!(page.eval("document.querySelectorAll('img').length"), 0);
    assert!(page.events("Page.javascriptDialogOpening").is_empty());
    assert_eq!(page.page_errors(), Vec::<String>::new());
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_operator_rolls_back_from_the_page_and_is_its_author() {
    let Some(chromium) = chromium() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens");
    std::fs::write(&tokens, "# operators\nalice alice-0123456789abcdef\n").unwrap();
    let dashboard = free_addr();
    let dashboard_arg = dashboard.to_string();
    let controller = Controller::start(
        &data.path().join("store"),
        &[
            "--dashboard",
            &dashboard_arg,
            "--dashboard-tokens",
            tokens.to_str().unwrap(),
        ],
    );
    let url = controller.url();
    let origin = Origin::start("app").await;
    let node = Node::start(&node_config("a", &url, r#"env = "prod""#));
    for listen in ["127.0.0.1:0", "127.0.0.2:0"] {
        controller
            .publish(&traffic(listen, &origin), "")
            .await
            .unwrap();
    }
    wait_acked(&controller, &["a"], 2).await;

    let mut page = Browser::launch(&chromium);
    page.open(&format!("http://{dashboard}/"));
    page.wait_for(
        "the sign-in form",
        &format!(
            "{} && document.querySelectorAll('#versions tbody tr').length === 2",
            shown("sign-in")
        ),
        Duration::from_secs(10),
    );
    // Signed out, the page offers no action.
    assert_eq!(
        page.eval("document.querySelectorAll('button.rollback').length"),
        0
    );

    // A wrong token is refused and said so.
    page.eval(
        "document.getElementById('token').value = 'not-a-token-at-all';
         document.querySelector('#sign-in button').click()",
    );
    page.wait_for(
        "the refusal",
        "document.getElementById('sign-in-error').textContent === 'unknown token'",
        Duration::from_secs(5),
    );
    page.eval(
        "document.getElementById('token').value = 'alice-0123456789abcdef';
         document.querySelector('#sign-in button').click()",
    );
    page.wait_for(
        "signed in",
        "document.getElementById('operator').textContent === 'signed in as alice'",
        Duration::from_secs(5),
    );
    assert_eq!(page.eval(&shown("sign-in")), false);
    assert_eq!(page.eval(&shown("sign-out")), true);
    page.wait_for(
        "the rollback button",
        "document.querySelector('button.rollback')?.dataset.version === '1'",
        Duration::from_secs(5),
    );
    page.eval("document.querySelector('button.rollback').click()");
    page.wait_for(
        "the rollback published",
        "document.getElementById('action-result').textContent.startsWith('v3 published')",
        Duration::from_secs(5),
    );
    let versions = controller.versions().await;
    assert_eq!(versions[0].version, 3);
    assert_eq!(versions[0].rollback_of, 1);
    assert_eq!(versions[0].author, "alice");
    assert_eq!(versions[0].comment, "rollback to version 1");
    wait_acked(&controller, &["a"], 3).await;
    page.wait_for(
        "a on v3",
        &format!(
            "{}.querySelector('td.version').textContent === 'v3'",
            row("a")
        ),
        Duration::from_secs(10),
    );

    // A rollout in progress shows wave by wave, and the operator can
    // abort it: the node goes back to what it ran.
    let mut fleet = controller.fleet().await;
    fleet
        .publish_config(tether::proto::v1::PublishConfigRequest {
            config: traffic("127.0.0.3:0", &origin),
            rollout: Some(tether::proto::v1::RolloutPlan {
                waves: vec!["1,100%".to_owned()],
                bake_ms: 3_600_000,
                ack_timeout_ms: 60_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    page.wait_for(
        "the rollout baking",
        "document.querySelector('#versions tbody tr td.rollout').textContent === 'wave 1 of 2 · 1/1, 0/0 running · baking'",
        Duration::from_secs(10),
    );
    let headline = page.eval("document.getElementById('headline').textContent");
    assert_eq!(
        headline,
        "v4 on 1 of 1 nodes · rollout of v4: wave 1 of 2 · 1/1, 0/0 running · baking"
    );
    page.eval("document.querySelector('button.pause').click()");
    page.wait_for(
        "the rollout paused",
        "document.querySelector('#versions tbody tr td.rollout').textContent === 'wave 1 of 2 · 1/1, 0/0 running · paused'",
        Duration::from_secs(5),
    );
    page.eval("document.querySelector('button.resume').click()");
    page.wait_for(
        "the rollout running again",
        "document.querySelector('#versions tbody tr td.rollout').textContent.endsWith('running · baking')",
        Duration::from_secs(5),
    );
    page.eval("document.querySelector('button.abort').click()");
    page.wait_for(
        "the rollout aborted",
        "document.getElementById('action-result').textContent === 'rollout of v4 aborted: aborted by alice'",
        Duration::from_secs(5),
    );
    wait_acked(&controller, &["a"], 3).await;
    page.wait_for(
        "aborted in the history",
        "document.querySelector('#versions tbody tr td.rollout').textContent === 'aborted: aborted by alice'",
        Duration::from_secs(5),
    );

    // Signed out, the buttons are gone again.
    page.eval("document.getElementById('sign-out').click()");
    page.wait_for(
        "signed out",
        &format!(
            "{} && !{} && document.querySelectorAll('button.rollback').length === 0",
            shown("sign-in"),
            shown("sign-out")
        ),
        Duration::from_secs(5),
    );
    assert_eq!(page.page_errors(), Vec::<String>::new());
    drop(node);
}

/// Upstream health reaches the row as it changes: a server down, then up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_health_shows_in_the_row_and_follows_each_transition() {
    let Some(chromium) = chromium() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let dashboard = free_addr();
    let dashboard_arg = dashboard.to_string();
    let controller = Controller::start(data.path(), &["--dashboard", &dashboard_arg]);
    let url = controller.url();
    let node = Node::start(&node_config("a", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a"]).await;
    let mut page = Browser::launch(&chromium);
    page.open(&format!("http://{dashboard}/"));
    page.wait_for(
        "live",
        "document.getElementById('link').textContent === 'live'",
        Duration::from_secs(10),
    );

    let live = Origin::start("live").await;
    let later = free_addr();
    let config = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"app\"\n\
         [upstream.app]\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{later}\" }}]\n\
         [upstream.app.health]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n",
        live.addr
    );
    controller.publish(&config, "").await.unwrap();
    let health = format!("{}.querySelector('td.health').innerText", row("a"));
    let shown = page.wait_for(
        "one of two servers down",
        &format!("{}.dataset.state === 'degraded' && {health}", row("a")),
        Duration::from_secs(10),
    );
    assert_eq!(shown, format!("1/2 up\napp: {later} down"));
    page.wait_for(
        "the headline counts it",
        "document.getElementById('headline').textContent === 'v1 on 1 of 1 nodes · 1 with upstreams down'",
        Duration::from_secs(5),
    );

    // The server comes up: the row follows from the event alone.
    let _later = Origin::start_on(later, "later").await;
    page.wait_for(
        "both up",
        &format!(
            "{}.dataset.state === 'ok' && {health} === '2/2 up'",
            row("a")
        ),
        Duration::from_secs(10),
    );

    // The event feed's filter keeps only what matches.
    page.eval(
        "const f = document.getElementById('event-filter');
         f.value = 'healthy'; f.dispatchEvent(new Event('input'))",
    );
    let kinds = page.wait_for(
        "only health events",
        "(() => { const k = [...document.querySelectorAll('#events li')].map(li => li.dataset.kind);
                  return k.length > 0 && k.every(x => x === 'health') && k.length; })()",
        Duration::from_secs(5),
    );
    assert!(kinds.as_u64().unwrap() >= 2, "{kinds}");
    assert_eq!(page.page_errors(), Vec::<String>::new());
    drop(node);
}
