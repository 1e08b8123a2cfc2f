//! Fleet-wide upstream health: each server with the nodes that see it up
//! or down, over FleetService and `tether fleet health`.

use std::time::{Duration, Instant};

use crate::support::*;
use tether::proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_health_names_the_nodes_that_see_each_server_down() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let url = controller.url();
    let _a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let _b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a", "b"]).await;
    let live = Origin::start("live").await;
    let dead = free_addr();
    let config = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"app\"\n[upstream.app]\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{dead}\" }}]\n[upstream.app.health]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n",
        live.addr
    );
    controller.publish(&config, "").await.unwrap();
    wait_acked(&controller, &["a", "b"], 1).await;

    let deadline = Instant::now() + WAIT;
    let servers = loop {
        let servers = controller
            .fleet()
            .await
            .fleet_health(pb::FleetHealthRequest {
                upstream: "app".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .servers;
        let seen = |addr: String| servers.iter().find(|s| s.server == addr).cloned();
        let both = |ids: &[String]| ids.len() == 2;
        if seen(dead.to_string()).is_some_and(|s| both(&s.down))
            && seen(live.addr.to_string()).is_some_and(|s| both(&s.up))
        {
            break servers;
        }
        assert!(Instant::now() < deadline, "{servers:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(servers.len(), 2, "{servers:#?}");
    let down = servers
        .iter()
        .find(|s| s.server == dead.to_string())
        .unwrap();
    assert_eq!(
        (down.upstream.as_str(), &down.down[..]),
        ("app", &["a".to_owned(), "b".to_owned()][..])
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["fleet", "--controller", &url, "health"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("app/{dead} down on 2 of 2 nodes: a, b")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("app/{} up on 2 of 2 nodes", live.addr)),
        "{stdout}"
    );
}
