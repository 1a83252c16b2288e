//! Credentials: strings that are wiped on drop and never printed.

use std::fmt;

use zeroize::Zeroizing;

/// A credential (a SecretKey, a session token). Its `Debug` prints `<redacted>`; it has no
/// `Display` (nothing formats it by accident) and no `Serialize`; the memory is wiped when it
/// drops. Read it with [`SecretString::expose`], so that every use is visible.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wrap a credential.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(Zeroizing::new(value.into()))
    }

    /// The credential. Every call site handles a secret.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        SecretString::new(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = SecretString::new("hunter2-secret");
        assert_eq!(format!("{s:?}"), "SecretString(<redacted>)");
        assert!(!format!("{s:?} {:?}", s.clone()).contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-secret");
    }
}
