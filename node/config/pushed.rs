//! Configs pushed by a controller carry only traffic config (listeners,
//! routes, upstreams). The node-local sections come from the node's own
//! file, so a controller can never rebind a node's control port, point it
//! at another controller or change its identity.

use super::error::{parse_document, KeyPath, Locator, Problem};
use super::ConfigError;

/// Sections a node takes only from its own file.
/// `tunnel` carries the node's own certificate, like `controller`.
pub const NODE_LOCAL_SECTIONS: &[&str] = &["node", "control", "controller", "telemetry", "tunnel"];

/// Refuses pushed text that holds a node-local section, with the location
/// of each one.
pub fn check_pushed(text: &str) -> Result<(), Vec<ConfigError>> {
    let root = parse_document(text)?;
    let locator = Locator::new(text, &root);
    let errors: Vec<ConfigError> = root
        .get_ref()
        .iter()
        .map(|(key, _)| key.get_ref().as_ref())
        .filter(|name| NODE_LOCAL_SECTIONS.contains(name))
        .map(|name| {
            locator.locate(Problem {
                path: KeyPath::root().key(name),
                message: format!(
                    "[{name}] is node-local: a node takes it only from its own file, never \
                     from a controller"
                ),
            })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The text a node applies for a pushed config: the pushed sections first
/// (so errors keep their line numbers in the pushed text), then the
/// node-local sections of the node's own file.
pub fn compose_pushed(pushed: &str, local_file: &str) -> Result<String, Vec<ConfigError>> {
    check_pushed(pushed)?;
    let local: toml::Table = toml::from_str(local_file).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: 0,
            column: 0,
            message: format!("the node's own config file: {e}"),
        }]
    })?;
    let local: toml::Table = local
        .into_iter()
        .filter(|(name, _)| NODE_LOCAL_SECTIONS.contains(&name.as_str()))
        .collect();
    let local = toml::to_string(&local).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: 0,
            column: 0,
            message: format!("cannot re-encode the node-local sections: {e}"),
        }]
    })?;
    let mut text = String::with_capacity(pushed.len() + local.len() + 64);
    text.push_str(pushed);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("\n# Node-local sections, from the node's own file.\n");
    text.push_str(&local);
    Ok(text)
}
