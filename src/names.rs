//! The name rule and the validation error; a leaf below `auth` and `model`,
//! which both validate names (so neither has to import the other for it).

/// Largest accepted name: one leading character plus 62 more.
pub const MAX_NAME_LEN: usize = 63;

/// A value that failed validation, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidField {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Service and member names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
///
/// They appear in haproxy.cfg as proxy and server names and in URL paths, so
/// nothing outside this set may pass (no space, newline, `#`, quote or `/`).
pub fn validate_name(field: &'static str, name: &str) -> Result<(), InvalidField> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(InvalidField::new(
            field,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if !bytes[0].is_ascii_alphanumeric() {
        return Err(InvalidField::new(
            field,
            "must start with a letter or digit",
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(InvalidField::new(
            field,
            format!("character {bad:?} not allowed; use A-Z a-z 0-9 . _ -"),
        ));
    }
    Ok(())
}
