//! Config errors with their location: a key path and a line:column.

use std::fmt;
use std::ops::Range;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a config. `Display` gives `line:column: path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `upstream.api.servers[1].addr`; empty when the
    /// problem is not tied to one key (a TOML syntax error).
    pub path: String,
    /// 1-based; 0 when unknown.
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Where a key sits in the config text. The validated config keeps the
/// locations of what can still fail when it is applied (a listener's
/// address, its TLS material), so such errors are located without parsing
/// the text again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// Key path such as `listener[1].listen`.
    pub path: String,
    pub line: u32,
    pub column: u32,
}

impl Location {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// A problem found while validating, before it is located in the text.
#[derive(Debug)]
pub struct Problem {
    pub path: KeyPath,
    pub message: String,
}

/// A key path, built while walking the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Parses `text` as TOML with the spans errors are located by; every
/// syntax error is reported, located.
pub fn parse_document(text: &str) -> Result<Spanned<DeTable<'_>>, Vec<ConfigError>> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if syntax_errors.is_empty() {
        return Ok(root);
    }
    let locator = Locator::new(text, &root);
    Err(syntax_errors
        .iter()
        .map(|e| locator.locate_toml_error(&KeyPath::root(), e))
        .collect())
}

/// Maps key paths to text positions and back, over the parsed document.
pub struct Locator<'a> {
    text: &'a str,
    root: &'a Spanned<DeTable<'a>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str, root: &'a Spanned<DeTable<'a>>) -> Self {
        Locator { text, root }
    }

    /// Turns a validation problem into a located error. A path that does not
    /// exist in the text (a missing key) points at its nearest parent.
    pub fn locate(&self, problem: Problem) -> ConfigError {
        let span = self.span_of(&problem.path);
        self.error(problem.path.to_string(), span, problem.message)
    }

    /// Turns a serde error raised while deserializing the value at `base`
    /// into a located error whose path goes as deep as the error's position.
    pub fn locate_toml_error(&self, base: &KeyPath, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let path = match &span {
            Some(span) => self.path_at(span.start).unwrap_or_else(|| base.clone()),
            None => base.clone(),
        };
        let span = span.unwrap_or_else(|| self.span_of(base));
        self.error(path.to_string(), span, error.message().trim().to_owned())
    }

    /// Where `path` is (its nearest parent, if it is missing).
    pub fn location(&self, path: &KeyPath) -> Location {
        let (line, column) = line_column(self.text, self.span_of(path).start);
        Location {
            path: path.to_string(),
            line,
            column,
        }
    }

    pub fn error(&self, path: String, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError {
            path,
            line,
            column,
            message,
        }
    }

    fn span_of(&self, path: &KeyPath) -> Range<usize> {
        let mut span = self.root.span();
        let mut value: Option<&DeValue> = None;
        let mut table: &DeTable = self.root.get_ref();
        for segment in &path.0 {
            let next = match (segment, value) {
                (Segment::Key(key), _) => table
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == key.as_str())
                    .map(|(_, v)| v),
                (Segment::Index(index), Some(DeValue::Array(items))) => items.get(*index),
                (Segment::Index(_), _) => None,
            };
            let Some(next) = next else { break };
            span = next.span();
            value = Some(next.get_ref());
            if let DeValue::Table(inner) = next.get_ref() {
                table = inner;
            }
        }
        span
    }

    /// The key path whose key, value or table header contains `offset`.
    /// Table spans cover only their `[header]`, so every table is searched
    /// rather than only those whose span contains the offset.
    fn path_at(&self, offset: usize) -> Option<KeyPath> {
        let mut path = KeyPath::root();
        search_table(self.root.get_ref(), offset, &mut path).then_some(path)
    }
}

fn search_table(table: &DeTable, offset: usize, path: &mut KeyPath) -> bool {
    for (key, value) in table.iter() {
        path.0.push(Segment::Key(key.get_ref().to_string()));
        if key.span().contains(&offset) || search_value(value, offset, path) {
            return true;
        }
        path.0.pop();
    }
    false
}

fn search_value(value: &Spanned<DeValue>, offset: usize, path: &mut KeyPath) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => {
            search_table(table, offset, path) || value.span().contains(&offset)
        }
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                path.0.push(Segment::Index(index));
                if search_value(item, offset, path) {
                    return true;
                }
                path.0.pop();
            }
            value.span().contains(&offset)
        }
        _ => value.span().contains(&offset),
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line as u32, column as u32)
}
