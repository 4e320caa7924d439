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
                    format!("`{}` is not key=value", validate::quote(term)),
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

    /// The `key=value` terms, as written.
    pub fn terms(&self) -> &[(String, String)] {
        &self.terms
    }

    /// True when the selector has no terms.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

impl std::fmt::Display for Selector {
    /// `key=value,key2=value2`, as it is written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terms: Vec<String> = self.terms.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&terms.join(","))
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Selector-like text: terms, separators and spaces, with a fair
        /// share of characters that are not allowed.
        fn selectorish() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[a-z0-9=, ./_-]{0,40}",
                "([a-z]{1,3}=[a-z0-9 !]{0,3},?){0,5}",
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._/-]{1,40}"
        }

        fn value() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._-]{0,40}"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parse_never_panics_and_errors_name_the_field(field in "[a-z_.]{1,30}", s in selectorish()) {
                if let Err(e) = Selector::parse(&field, &s) {
                    prop_assert_eq!(&e.field, &field);
                    prop_assert!(!e.reason.is_empty());
                    prop_assert!(e.reason.len() <= 512, "{} bytes of reason", e.reason.len());
                }
            }

            #[test]
            fn a_long_bad_term_is_not_echoed_whole(n in 100usize..100_000) {
                let e = Selector::parse("label_selector", &"x".repeat(n)).unwrap_err();
                prop_assert!(e.reason.len() < 200, "{} bytes of reason", e.reason.len());
            }

            #[test]
            fn built_selectors_parse_and_match_their_labels(
                terms in prop::collection::btree_map(key(), value(), 0..8),
                extra in prop::collection::hash_map("[A-Z]{1,5}", value(), 0..4),
                spaced in any::<bool>(),
            ) {
                let sep = if spaced { " , " } else { "," };
                let text = terms.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(sep);
                let sel = Selector::parse("sel", &text).unwrap();
                prop_assert_eq!(sel.is_empty(), terms.is_empty());
                // Extra labels change nothing (the terms go in last, so they win a shared key).
                let mut labels: HashMap<String, String> = extra;
                labels.extend(terms.clone());
                prop_assert!(sel.matches(&labels));
                // Any one term missing or different: no match.
                if let Some((k, v)) = terms.iter().next() {
                    let mut other = labels.clone();
                    other.insert(k.clone(), format!("{v}x"));
                    prop_assert!(!sel.matches(&other));
                    other.remove(k);
                    prop_assert!(!sel.matches(&other));
                }
            }
        }
    }
}
