//! YAML errors the way Weft reports them: the line and column apart from the reason, so that
//! a caller can name its own file (or shift the line to where a piece of the file starts).

use serde_saphyr::{DefaultMessageFormatter, MessageFormatter};

/// Where a YAML text went wrong and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlFault {
    /// 1-based line and column in the text parsed, when the parser knows them.
    pub at: Option<(usize, usize)>,
    /// One line, without the location (serde-saphyr's own rendering draws a snippet).
    pub reason: String,
}

impl From<&serde_saphyr::Error> for YamlFault {
    fn from(error: &serde_saphyr::Error) -> Self {
        let at = error
            .location()
            .filter(|l| l.line() > 0)
            .map(|l| (to_usize(l.line()), to_usize(l.column())));
        let bare = error.without_snippet();
        let reason = DefaultMessageFormatter.format_message(bare);
        // The text can quote the input: keep it on one line, control characters escaped.
        let reason = reason
            .chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_debug().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect();
        YamlFault { at, reason }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read only by the deserializer
    struct Port {
        port: u16,
    }

    #[test]
    fn location_and_reason_apart() {
        let error = serde_saphyr::from_str::<Port>("\nport: 70000\n").unwrap_err();
        let fault = YamlFault::from(&error);
        assert_eq!(fault.at, Some((2, 7)));
        assert!(!fault.reason.contains('\n'), "{}", fault.reason);
        assert!(!fault.reason.contains("line 2"), "{}", fault.reason);
        assert_eq!(fault.reason, "invalid u16");
    }

    #[test]
    fn control_characters_stay_escaped() {
        let error = serde_saphyr::from_str::<Port>("port: \"a\\nb\\u001b\"\n").unwrap_err();
        let fault = YamlFault::from(&error);
        assert!(
            !fault.reason.contains('\n') && !fault.reason.contains('\u{1b}'),
            "{fault:?}"
        );
    }
}
