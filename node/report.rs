//! Error text for logs and people.

/// The whole cause chain, e.g. "client error (Connect): tcp connect error:
/// Connection refused", which the errors' own Display leaves out.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
