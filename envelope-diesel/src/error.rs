//! Finding and showing the envelope error inside a diesel error.

use std::fmt;

/// The [`envelope_core::Error`] inside a diesel error, if that is what failed. diesel wraps a
/// read error in a [`DeserializeFieldError`](diesel::result::DeserializeFieldError) naming the
/// field; this looks through it.
///
/// ```
/// # fn handle(e: diesel::result::Error) {
/// match envelope_diesel::envelope_error(&e) {
///     Some(envelope_core::Error::Misuse(envelope_core::Misuse::NoKeyring)) => { /* install or enter a keyring */ }
///     Some(other) => eprintln!("envelope: {other}"),
///     None => eprintln!("database: {e}"),
/// }
/// # }
/// ```
pub fn envelope_error(e: &diesel::result::Error) -> Option<&envelope_core::Error> {
    let source = match e {
        diesel::result::Error::SerializationError(source)
        | diesel::result::Error::DeserializationError(source) => source,
        _ => return None,
    };
    match source.downcast_ref::<diesel::result::DeserializeFieldError>() {
        Some(field) => field.error.downcast_ref(),
        None => source.downcast_ref(),
    }
}

/// A diesel error with its causes, for logs and messages: diesel's `Display` of a read error
/// names only the field (`Error deserializing field 'email'`); this adds why, from the error's
/// sources (`…: the value was sealed for another column: …`). It shows what the error messages
/// show, never a value or a key.
///
/// ```
/// # fn handle(e: diesel::result::Error) {
/// // or tracing::error!(error = %envelope_diesel::report(&e), "loading the customer failed");
/// eprintln!("loading the customer failed: {}", envelope_diesel::report(&e));
/// # }
/// ```
pub fn report(e: &diesel::result::Error) -> Report<'_> {
    Report(e)
}

/// What [`report`] returns: `Display` writes the error and each cause it does not already show.
pub struct Report<'a>(&'a diesel::result::Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            let text = cause.to_string();
            // An error whose message already includes its cause's would repeat it.
            if !text.is_empty() && !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&shown)
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
