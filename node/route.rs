//! Request routing: host first (exact, then the longest wildcard, then any
//! host), then the longest path prefix within that host, as nginx picks a
//! server block and then a location. No match is a 404.
//!
//! Tables are built once per generation; a lookup allocates nothing.

use std::collections::HashMap;

use crate::config::HostPattern;

pub struct Router<T> {
    exact: HashMap<String, PrefixTree<T>>,
    wildcard: HashMap<String, PrefixTree<T>>,
    any: Option<PrefixTree<T>>,
}

impl<T> Router<T> {
    pub fn new(routes: impl IntoIterator<Item = (HostPattern, String, T)>) -> Self {
        let mut router = Router {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        };
        for (host, prefix, value) in routes {
            let tree = match host {
                HostPattern::Any => router.any.get_or_insert_with(PrefixTree::new),
                HostPattern::Exact(name) => {
                    router.exact.entry(name).or_insert_with(PrefixTree::new)
                }
                HostPattern::Wildcard(suffix) => router
                    .wildcard
                    .entry(suffix)
                    .or_insert_with(PrefixTree::new),
            };
            tree.insert(prefix.as_bytes(), value);
        }
        router
    }

    /// `host` may carry a port and any letter case; `path` is the URI path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let tree = host
            .map(|host| {
                // `example.com.` is `example.com` (a fully qualified name).
                let host = strip_port(host);
                host.strip_suffix('.').unwrap_or(host)
            })
            .and_then(|host| self.host_tree(host))
            .or(self.any.as_ref())?;
        tree.longest_match(path.as_bytes())
    }

    fn host_tree(&self, host: &str) -> Option<&PrefixTree<T>> {
        let mut lowered = [0u8; 256];
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) && host.len() <= lowered.len() {
            let buf = &mut lowered[..host.len()];
            buf.copy_from_slice(host.as_bytes());
            buf.make_ascii_lowercase();
            std::str::from_utf8(buf).ok()?
        } else {
            host
        };
        if let Some(tree) = self.exact.get(host) {
            return Some(tree);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // ".b.example.com", then ".example.com", then ".com": longest first.
        host.match_indices('.')
            .find_map(|(i, _)| self.wildcard.get(&host[i..]))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8080"
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rfind(':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

/// A compressed byte trie answering "longest inserted prefix of this key".
struct PrefixTree<T> {
    root: Node<T>,
}

struct Node<T> {
    value: Option<T>,
    /// Sorted by the first byte of each edge label, which is unique.
    children: Vec<(Box<[u8]>, Node<T>)>,
}

impl<T> Node<T> {
    fn empty() -> Self {
        Node {
            value: None,
            children: Vec::new(),
        }
    }
}

impl<T> PrefixTree<T> {
    fn new() -> Self {
        PrefixTree {
            root: Node::empty(),
        }
    }

    /// Inserts `key`; a later insert of the same key replaces the value.
    fn insert(&mut self, mut key: &[u8], value: T) {
        let mut node = &mut self.root;
        loop {
            let Some(&first) = key.first() else {
                node.value = Some(value);
                return;
            };
            let slot = node
                .children
                .binary_search_by_key(&first, |(label, _)| label[0]);
            let index = match slot {
                Err(index) => {
                    let mut leaf = Node::empty();
                    leaf.value = Some(value);
                    node.children.insert(index, (key.into(), leaf));
                    return;
                }
                Ok(index) => index,
            };
            let (label, _) = &node.children[index];
            let common = label.iter().zip(key).take_while(|(a, b)| a == b).count();
            if common < label.len() {
                // Split the edge at the end of the common part.
                let (label, child) = node.children.remove(index);
                let mut middle = Node::empty();
                middle.children.push((label[common..].into(), child));
                node.children
                    .insert(index, (label[..common].into(), middle));
            }
            node = &mut node.children[index].1;
            key = &key[common..];
        }
    }

    fn longest_match(&self, mut key: &[u8]) -> Option<&T> {
        let mut node = &self.root;
        let mut best = node.value.as_ref();
        while let Some(&first) = key.first() {
            let Ok(index) = node
                .children
                .binary_search_by_key(&first, |(label, _)| label[0])
            else {
                break;
            };
            let (label, child) = &node.children[index];
            if !key.starts_with(label) {
                break;
            }
            key = &key[label.len()..];
            node = child;
            if node.value.is_some() {
                best = node.value.as_ref();
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(HostPattern, &str, &'static str)]) -> Router<&'static str> {
        Router::new(
            routes
                .iter()
                .map(|(h, p, v)| (h.clone(), p.to_string(), *v)),
        )
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insert_order() {
        let r = router(&[
            (HostPattern::Any, "/api/v1/", "v1"),
            (HostPattern::Any, "/", "root"),
            (HostPattern::Any, "/api/", "api"),
            (HostPattern::Any, "/apix", "apix"),
        ]);
        assert_eq!(r.find(None, "/api/v1/users"), Some(&"v1"));
        assert_eq!(r.find(None, "/api/v2"), Some(&"api"));
        assert_eq!(r.find(None, "/api"), Some(&"root"));
        assert_eq!(r.find(None, "/apixyz"), Some(&"apix"));
        assert_eq!(r.find(None, "/other"), Some(&"root"));
    }

    #[test]
    fn exact_host_then_longest_wildcard_then_any() {
        let r = router(&[
            (HostPattern::Exact("a.example.com".into()), "/", "exact"),
            (HostPattern::Wildcard(".example.com".into()), "/", "wild"),
            (
                HostPattern::Wildcard(".b.example.com".into()),
                "/",
                "wild-b",
            ),
            (HostPattern::Any, "/", "any"),
        ]);
        assert_eq!(r.find(Some("A.Example.com:8080"), "/"), Some(&"exact"));
        assert_eq!(r.find(Some("x.example.com"), "/"), Some(&"wild"));
        assert_eq!(r.find(Some("x.b.example.com"), "/"), Some(&"wild-b"));
        assert_eq!(r.find(Some("example.com"), "/"), Some(&"any"));
        assert_eq!(r.find(None, "/"), Some(&"any"));
        assert_eq!(r.find(Some("[::1]:80"), "/"), Some(&"any"));
    }

    #[test]
    fn a_matched_host_does_not_fall_back_to_other_hosts() {
        let r = router(&[
            (HostPattern::Exact("api.test".into()), "/v1/", "api"),
            (HostPattern::Any, "/", "any"),
        ]);
        assert_eq!(r.find(Some("api.test"), "/v1/x"), Some(&"api"));
        assert_eq!(r.find(Some("api.test"), "/other"), None);
    }

    #[test]
    fn many_routes_each_found() {
        let paths: Vec<String> = (0..2000).map(|i| format!("/svc/{i}/")).collect();
        let r = Router::new(
            paths
                .iter()
                .enumerate()
                .map(|(i, p)| (HostPattern::Any, p.clone(), i)),
        );
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(r.find(None, &format!("{p}item")), Some(&i));
        }
        assert_eq!(r.find(None, "/svc/"), None);
    }
}
