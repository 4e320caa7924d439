//! Agent ids: lowercase ULIDs, so that ids sort by creation time and are safe
//! in Redis keys, URLs and file names.

/// Whether `s` has the shape of an agent id (26 characters of Crockford's
/// base32, as a lowercase ULID): such a string names an agent by id, any
/// other by name. Names of this shape are refused
/// ([`crate::validate::name`]), so an id and a name never collide.
pub fn is_agent_id(s: &str) -> bool {
    s.len() == 26
        && s.bytes().all(|b| {
            b.is_ascii_digit()
                || (b.is_ascii_lowercase() && !matches!(b, b'i' | b'l' | b'o' | b'u'))
        })
}

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
        assert!(is_agent_id(&a), "{a}");
    }

    #[test]
    fn only_26_base32_characters_look_like_an_id() {
        assert!(is_agent_id("01m96j39kvbv11ajjf93npncmj"));
        assert!(!is_agent_id("web"));
        assert!(!is_agent_id("01m96j39kvbv11ajjf93npncm"), "25 characters");
        assert!(
            !is_agent_id("01m96j39kvbv11ajjf93npncmu"),
            "u is not base32"
        );
        assert!(!is_agent_id("01m96j39kvbv11ajjf93npnc-j"));
    }
}
