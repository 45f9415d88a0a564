//! What every module's settings are made of: the field-named problem ([`ConfigIssue`]), the
//! collector a section's validation reports into ([`Issues`]), and the value parsers they
//! share (durations).
//!
//! Each module owns its section of the config file: a `Raw*` struct as written (serde,
//! `deny_unknown_fields`, every field optional) and a validated settings type with
//! defaults, built by a `from_raw(raw, &mut Issues)` that names the field of every problem
//! (`health.open_duration: ...`). [`crate::config`] only loads the file and assembles the
//! sections. This module sits below all of them and depends on nothing in the crate.

use std::time::Duration;

/// A configuration problem, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigIssue {
    /// Dotted path of the field, e.g. `providers.openai.base_url`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Tests' helper: a section's settings from its TOML text, or its problems as
/// `field: message` lines.
#[cfg(test)]
pub(crate) fn from_toml<R: serde::de::DeserializeOwned, S>(
    toml_text: &str,
    from_raw: impl FnOnce(R, &mut Issues) -> S,
) -> Result<S, Vec<String>> {
    let raw: R = toml::from_str(toml_text).unwrap();
    let mut issues = Issues::new();
    let settings = from_raw(raw, &mut issues);
    match issues.is_empty() {
        true => Ok(settings),
        false => Err(issues.into_vec().iter().map(ToString::to_string).collect()),
    }
}

/// The problems found while validating, in the order found.
#[derive(Debug, Default)]
pub struct Issues(Vec<ConfigIssue>);

impl Issues {
    /// No problems yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is wrong.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems found.
    pub fn into_vec(self) -> Vec<ConfigIssue> {
        self.0
    }

    /// A duration greater than zero; `default` when unset (or invalid, recorded).
    pub fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) if d > Duration::ZERO => d,
            Some(Ok(_)) => {
                self.push(field, "must be greater than zero");
                default
            }
            Some(Err(e)) => {
                self.push(field, e);
                default
            }
        }
    }

    /// A duration that may be zero; `default` when unset (or invalid, recorded).
    pub fn duration_or_zero(
        &mut self,
        field: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.push(field, e);
                default
            }
        }
    }
}

/// Parses a duration such as `250ms`, `30s`, `2m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. `250ms`, `30s`, `2m`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_name_the_field() {
        let mut issues = Issues::new();
        let d = Duration::from_secs(1);
        assert_eq!(
            issues.duration("a", Some("2m"), d),
            Duration::from_secs(120)
        );
        assert_eq!(issues.duration("b", None, d), d);
        assert_eq!(issues.duration("c", Some("0s"), d), d);
        assert_eq!(issues.duration_or_zero("d", Some("0s"), d), Duration::ZERO);
        assert_eq!(issues.duration_or_zero("e", Some("soon"), d), d);
        let issues = issues.into_vec();
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(fields, ["c", "e"]);
        assert_eq!(issues[0].message, "must be greater than zero");
        assert!(
            issues[1].message.contains("is not a duration"),
            "{issues:?}"
        );
    }
}
