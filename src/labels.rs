//! Label selectors (`key=value,key2=value2`): parsing and matching.

use std::collections::HashMap;

use crate::validate::{self, ValidationError};

/// A parsed selector: every term must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<(String, String)>,
}

impl Selector {
    /// Parses `key=value[,key=value…]`; empty means "match everything".
    /// `field` names the request field in the error.
    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let Some((k, v)) = term.split_once('=') else {
                return Err(ValidationError::new(
                    field,
                    format!("`{term}` is not key=value"),
                ));
            };
            validate::label_key(field, k.trim())?;
            validate::label_value(field, v.trim())?;
            terms.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    /// True when every term is present in `labels` with the same value.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.terms
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }

    /// True when the selector has no terms.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let s = Selector::parse("sel", "a=1, b=2").unwrap();
        let mut labels = HashMap::from([("a".to_owned(), "1".to_owned())]);
        assert!(!s.matches(&labels));
        labels.insert("b".to_owned(), "2".to_owned());
        assert!(s.matches(&labels));
        assert!(Selector::parse("sel", "").unwrap().is_empty());
    }

    #[test]
    fn term_without_equals_names_the_field() {
        let e = Selector::parse("placement.label_selector", "gpu").unwrap_err();
        assert_eq!(
            e.to_string(),
            "placement.label_selector: `gpu` is not key=value"
        );
    }
}
