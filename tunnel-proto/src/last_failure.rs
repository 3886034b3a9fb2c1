//! A failure that repeats on every retry (a poll, a reconnect) is logged once per distinct
//! message, and again after it cleared and came back.

/// The last failure reported by one retry loop.
#[derive(Debug, Default)]
pub struct LastFailure(Option<String>);

impl LastFailure {
    /// Records `message`; true if it differs from the last one, which the caller then logs.
    pub fn is_new(&mut self, message: &str) -> bool {
        if self.0.as_deref() == Some(message) {
            return false;
        }
        self.0 = Some(message.to_owned());
        true
    }

    /// The failure standing now, if any.
    pub fn current(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The failure is over: the next one is logged again.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_is_new_once_and_again_after_clearing() {
        let mut last = LastFailure::default();
        assert!(last.is_new("down"));
        assert!(!last.is_new("down"));
        assert!(last.is_new("other"));
        last.clear();
        assert!(last.is_new("other"));
    }
}
