//! The Kubernetes manifests keep the promises that matter, in the base and
//! in every overlay as `kubectl kustomize` renders them: probes on every
//! container, non-root with a read-only root filesystem and no
//! capabilities, a termination grace that outlasts the node's drain, and a
//! control port that no Service exposes. (`deploy/validate.sh` checks the
//! same renderings against the Kubernetes schemas.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn render(dir: &Path) -> Vec<Value> {
    let output = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl renders the manifests (install kubectl)");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).expect("YAML"))
        .filter(|value: &Value| !value.is_null())
        .collect()
}

fn renderings() -> Vec<(String, Vec<Value>)> {
    let mut dirs = vec![deploy().join("base")];
    let overlays = std::fs::read_dir(deploy().join("overlays")).unwrap();
    dirs.extend(overlays.map(|entry| entry.unwrap().path()));
    dirs.into_iter()
        .map(|dir| (dir.display().to_string(), render(&dir)))
        .collect()
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];

fn workloads(objects: &[Value]) -> impl Iterator<Item = &Value> {
    objects
        .iter()
        .filter(|o| WORKLOADS.contains(&o["kind"].as_str().unwrap_or_default()))
}

fn name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The node config the ConfigMap carries.
fn node_config(objects: &[Value]) -> tether::config::Config {
    let map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["node.toml"].is_string())
        .expect("a ConfigMap with node.toml");
    let text = map["data"]["node.toml"].as_str().unwrap();
    // Its files (certificates, the labels file) live in the pod.
    tether::config::Config::parse_portable(text).expect("node.toml is valid")
}

#[test]
fn every_container_has_probes_and_runs_unprivileged() {
    for (dir, objects) in renderings() {
        let mut checked = 0;
        for workload in workloads(&objects) {
            let pod = &workload["spec"]["template"]["spec"];
            let who = format!("{dir}: {}", name(workload));
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{who}");
            assert!(
                pod["securityContext"]["runAsUser"].as_u64().unwrap_or(0) > 0,
                "{who}"
            );
            for container in pod["containers"].as_array().unwrap() {
                assert!(
                    container["readinessProbe"].is_object(),
                    "{who}: readiness probe"
                );
                assert!(
                    container["livenessProbe"].is_object(),
                    "{who}: liveness probe"
                );
                let security = &container["securityContext"];
                assert_eq!(security["readOnlyRootFilesystem"], true, "{who}");
                assert_eq!(security["allowPrivilegeEscalation"], false, "{who}");
                assert_eq!(
                    security["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{who}"
                );
                assert!(
                    container["resources"]["requests"].is_object(),
                    "{who}: requests"
                );
                assert!(
                    container["resources"]["limits"]["memory"].is_string(),
                    "{who}: memory limit"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "{dir}: controller and node containers");
    }
}

#[test]
fn a_stopping_node_always_gets_its_full_drain() {
    for (dir, objects) in renderings() {
        let drain = node_config(&objects).node.drain_timeout;
        let nodes: Vec<&Value> = workloads(&objects)
            .filter(|w| w["metadata"]["name"] == "tether-node")
            .collect();
        assert_eq!(nodes.len(), 1, "{dir}: one node workload");
        for node in nodes {
            let pod = &node["spec"]["template"]["spec"];
            let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
            let pre_stop = Duration::from_secs(
                pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
                    .as_u64()
                    .unwrap_or(0),
            );
            assert!(
                grace >= pre_stop + drain,
                "{dir}: {}: grace {grace:?} < preStop {pre_stop:?} + drain_timeout {drain:?}",
                name(node)
            );
        }
    }
}

#[test]
fn the_control_port_stays_inside_the_pod() {
    for (dir, objects) in renderings() {
        let config = node_config(&objects);
        let control = config.control.listen;
        assert!(
            control.ip().is_loopback(),
            "{dir}: control listens on {control}"
        );
        for service in objects.iter().filter(|o| o["kind"] == "Service") {
            for port in service["spec"]["ports"].as_array().unwrap() {
                for key in ["port", "targetPort"] {
                    assert_ne!(
                        port[key].as_u64(),
                        Some(u64::from(control.port())),
                        "{dir}: {} exposes the control port",
                        name(service)
                    );
                }
            }
        }
        // No container declares it either.
        for workload in workloads(&objects) {
            for container in workload["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
            {
                for port in container["ports"].as_array().into_iter().flatten() {
                    assert_ne!(
                        port["containerPort"].as_u64(),
                        Some(u64::from(control.port()))
                    );
                }
            }
        }
    }
}

#[test]
fn the_controller_keeps_its_store_on_a_volume_or_in_etcd() {
    for (dir, objects) in renderings() {
        let controller = objects
            .iter()
            .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "tether-controller")
            .unwrap_or_else(|| panic!("{dir}: controller StatefulSet"));
        let container = &controller["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        match args.iter().find_map(|a| a.strip_prefix("--store=")) {
            Some(store) => replicas_on_etcd(&dir, &objects, controller, &args, store),
            None => store_on_a_volume(&dir, controller, container, &args),
        }
        // Probes use grpc.health.v1 on the plain health port.
        assert!(
            container["readinessProbe"]["grpc"]["port"].is_u64(),
            "{dir}"
        );
        assert!(
            args.iter().any(|a| a.starts_with("--health-listen=")),
            "{dir}"
        );
        // The controller is reached with mTLS.
        for flag in ["--cert=", "--key=", "--client-ca="] {
            assert!(args.iter().any(|a| a.starts_with(flag)), "{dir}: {flag}");
        }
        // The dashboard has no tokens here: it stays on the pod's loopback,
        // where only `kubectl port-forward` reaches it.
        let dashboard = args
            .iter()
            .find_map(|a| a.strip_prefix("--dashboard="))
            .unwrap_or_else(|| panic!("{dir}: --dashboard"));
        assert!(dashboard.starts_with("127.0.0.1:"), "{dir}: {dashboard}");
        assert!(
            !args.iter().any(|a| a.starts_with("--dashboard-tokens")),
            "{dir}"
        );
    }
}

/// One controller: its log on a PersistentVolume.
fn store_on_a_volume(dir: &str, controller: &Value, container: &Value, args: &[&str]) {
    let data = args
        .iter()
        .find_map(|a| a.strip_prefix("--data="))
        .expect("--data or --store");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == data)
        .unwrap_or_else(|| panic!("{dir}: {data} is mounted"));
    let claims: Vec<&str> = controller["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    assert!(
        claims.contains(&mount["name"].as_str().unwrap()),
        "{dir}: a PVC backs {data}"
    );
}

/// Replicas on etcd: at least three, each named after its pod, spread
/// over machines, two kept through disruptions, and every etcd member the
/// store names exists in the rendering with a quorum kept too.
fn replicas_on_etcd(dir: &str, objects: &[Value], controller: &Value, args: &[&str], store: &str) {
    assert!(!args.iter().any(|a| a.starts_with("--data=")), "{dir}");
    assert!(controller["spec"]["replicas"].as_u64() >= Some(3), "{dir}");
    assert!(args.contains(&"--replica=$(POD_NAME)"), "{dir}: {args:?}");
    let spec = &controller["spec"]["template"]["spec"];
    assert!(
        spec["affinity"]["podAntiAffinity"].is_object(),
        "{dir}: replicas spread over machines"
    );
    let budget = |name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == "PodDisruptionBudget" && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{dir}: PodDisruptionBudget {name}"))["spec"]["minAvailable"]
            .as_u64()
    };
    assert_eq!(budget("tether-controller"), Some(2), "{dir}");
    let (endpoints, prefix) = tether::controller::store_url(store).expect("a valid --store");
    assert!(!prefix.is_empty());
    let etcd = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "tether-etcd")
        .unwrap_or_else(|| panic!("{dir}: etcd StatefulSet"));
    let members = etcd["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(endpoints.len() as u64, members, "{dir}: {endpoints:?}");
    for (i, endpoint) in endpoints.iter().enumerate() {
        assert_eq!(
            endpoint,
            &format!("http://tether-etcd-{i}.tether-etcd:2379"),
            "{dir}"
        );
    }
    assert_eq!(
        budget("tether-etcd"),
        Some(members / 2 + 1),
        "{dir}: a quorum stays"
    );
}
