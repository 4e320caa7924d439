//! Agent ids: lowercase ULIDs, so that ids sort by creation time and are safe
//! in Redis keys, URLs and file names.

/// A new, unique agent id.
pub fn new_agent_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_lowercase_and_valid() {
        let a = new_agent_id();
        let b = new_agent_id();
        assert_ne!(a, b);
        assert_eq!(a, a.to_ascii_lowercase());
        assert!(crate::validate::agent_id("id", &a).is_ok());
    }
}
