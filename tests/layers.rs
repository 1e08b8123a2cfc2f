//! The crate's modules form layers that point one way. `LAYERS` lists
//! every top-level module from the bottom up; a module may use only those
//! below it, so the import graph has no cycle. The controller may use only
//! the shared layer, never the node's internals. A new module goes into
//! the list where its imports put it; an import that points up fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom first.
const LAYERS: &[&str] = &[
    // Shared: the wire contract, plumbing, vocabulary.
    "proto",
    "report",
    "durable",
    "pki",
    "config",
    "events",
    "wire",
    "grpc",
    "identity",
    "telemetry",
    // The data path, in the order a request meets it (from the bottom).
    "workers",
    "stream",
    "tls",
    "route",
    "relay",
    "tunnel",
    "health",
    "upstream",
    "lifecycle",
    "http",
    "tcp_proxy",
    "proxy",
    // What a config builds, and the one apply path.
    "generation",
    "listen",
    "supervisor",
    // What drives a node, and the controller.
    "control",
    "agent",
    "run",
    "controller",
    // The command line.
    "certs",
    "ctl",
    "cli",
];

/// The shared layer, the bottom of `LAYERS` up to this module: all the
/// controller may use.
const TOP_OF_SHARED_LAYER: &str = "telemetry";

/// Top-level module → the top-level modules its (non-test) code uses.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    collect(&root.join("node"), &mut files);
    collect(&root.join("controller"), &mut files);
    for file in files {
        let relative = file.strip_prefix(root).unwrap();
        let top = match relative.components().next().unwrap().as_os_str().to_str() {
            Some("controller") => "controller".to_owned(),
            _ => {
                let inside = relative.strip_prefix("node").unwrap();
                let first = inside.components().next().unwrap().as_os_str();
                first.to_string_lossy().trim_end_matches(".rs").to_owned()
            }
        };
        if matches!(top.as_str(), "lib" | "main") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let used = graph.entry(top.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                used.insert(name);
            }
        }
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn every_module_is_placed_in_the_layers() {
    let lib = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/node/lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    let listed: BTreeSet<&str> = LAYERS.iter().copied().collect();
    assert_eq!(
        declared, listed,
        "node/lib.rs and LAYERS must name the same modules"
    );
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut upward = Vec::new();
    for (module, used) in imports() {
        let Some(&own) = rank.get(module.as_str()) else {
            panic!("{module} is not in LAYERS");
        };
        for target in used {
            let Some(&theirs) = rank.get(target.as_str()) else {
                continue;
            };
            if theirs > own {
                upward.push(format!("{module} uses {target}, which is above it"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_controller_uses_only_the_shared_layer() {
    let graph = imports();
    let top = LAYERS
        .iter()
        .position(|m| *m == TOP_OF_SHARED_LAYER)
        .unwrap();
    let shared = &LAYERS[..=top];
    let outside: Vec<&String> = graph["controller"]
        .iter()
        .filter(|m| !shared.contains(&m.as_str()) && LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "the controller uses node internals: {outside:?}"
    );
}
