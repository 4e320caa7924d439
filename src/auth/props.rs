//! Property tests: the token file parser and [`super::decide`] take input
//! from outside (a hand-edited file, any client's headers), so no input may
//! panic them, and their answers must follow the rules for any input.

use std::path::Path;

use proptest::prelude::*;

use super::tests::table;
use super::*;

const KNOWN: &[&str] = &[
    "/agentplane.v1.AgentService/GetAgent",
    "/agentplane.v1.AgentService/SpawnAgent",
    "/agentplane.v1.HostService/DrainHost",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

fn role_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("viewer"), Just("operator"), Just("admin")]
}

/// A path: known ones, near misses, and noise.
fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(KNOWN).prop_map(str::to_owned),
        "/agentplane\\.v1\\.(Agent|Host)Service/[A-Za-z]{0,12}",
        "/[a-z.]{0,20}/[A-Za-z/]{0,12}",
        any::<String>(),
    ]
}

/// A header: well-formed with a known or unknown token, and noise.
fn header() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "(?i:bearer)[ \t]{1,3}tok-[voax]".prop_map(Some),
        "[ \t]{0,2}[A-Za-z]{0,8}[ \t]{0,3}[ -~]{0,20}".prop_map(Some),
        any::<String>().prop_map(Some),
    ]
}

proptest! {
    #[test]
    fn any_text_parses_or_errors(text in any::<String>()) {
        let _ = TokenTable::parse(Path::new("/p"), &text);
    }

    #[test]
    fn any_bytes_parse_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let r = TokenTable::parse_bytes(Path::new("/p"), &bytes);
        if std::str::from_utf8(&bytes).is_err() {
            let is_read_error = matches!(r, Err(AuthError::ReadTokenFile { .. }));
            prop_assert!(is_read_error);
        }
    }

    /// Token-file-shaped text with arbitrary field values: errors, when there
    /// are, always name the file, and never panic.
    #[test]
    fn any_field_values_parse_or_error(
        fields in proptest::collection::vec(
            ("[a-z0-9]{0,6}", "[a-z0-9=,]{0,70}", "[a-z]{0,9}", proptest::option::of("[a-z0-9=, ]{0,12}")),
            0..4,
        )
    ) {
        let mut text = String::new();
        for (name, sha, role, sel) in &fields {
            text += &format!("[[token]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nrole = \"{role}\"\n");
            if let Some(s) = sel {
                text += &format!("selector = \"{s}\"\n");
            }
        }
        if let Err(e) = TokenTable::parse(Path::new("/p"), &text) {
            prop_assert!(e.to_string().starts_with("token file /p: "));
        }
    }

    /// A valid file of distinct entries: every token authenticates as its
    /// own entry and a token not in it as no one.
    #[test]
    fn valid_files_round_trip(
        entries in proptest::collection::btree_map("[a-z][a-z0-9-]{0,10}", role_name(), 0..6),
        stranger in "[a-z]{0,12}",
    ) {
        let mut text = String::new();
        for (name, role) in &entries {
            text += &format!(
                "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\n",
                digest_hex(&format!("token:{name}"))
            );
        }
        let t = TokenTable::parse(Path::new("/p"), &text).unwrap();
        prop_assert_eq!(t.len(), entries.len());
        for (name, role) in &entries {
            let p = t.authenticate(&format!("token:{name}")).unwrap();
            prop_assert_eq!(&p.name, name);
            prop_assert_eq!(p.role.as_str(), *role);
        }
        prop_assert!(t.authenticate(&stranger).is_none());
    }

    #[test]
    fn decide_never_panics_and_follows_the_rules(path in path(), h in header()) {
        let t = table();
        let got = decide(Some(&t), &path, h.as_deref());
        prop_assert_eq!(decide(None, &path, h.as_deref()), Ok(None));
        match required_role(&path) {
            Access::Public => prop_assert_eq!(got, Ok(None)),
            Access::AtLeast(needed) => match got {
                Ok(Some(p)) => prop_assert!(p.role >= needed),
                Ok(None) => prop_assert!(false, "a token-gated path allowed with no principal"),
                Err(Denied::PermissionDenied { role, needed: n }) => {
                    prop_assert_eq!(n, needed);
                    prop_assert!(role < needed);
                }
                Err(Denied::Unauthenticated) => {}
            },
        }
    }

    /// Any method name the table does not list needs an admin.
    #[test]
    fn unknown_methods_are_admin_only(m in "[a-z][A-Za-z]{0,15}") {
        // Lowercase first: every real RPC name starts uppercase.
        let path = format!("/agentplane.v1.AgentService/{m}");
        prop_assert_eq!(required_role(&path), Access::AtLeast(Role::Admin));
        let t = table();
        prop_assert_eq!(
            decide(Some(&t), &path, Some("Bearer tok-o")),
            Err(Denied::PermissionDenied { role: Role::Operator, needed: Role::Admin })
        );
    }
}
