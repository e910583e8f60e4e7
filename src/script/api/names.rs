//! The names a script may use on a message object and as a hook, for the errors that say
//! "did you mean": reading `req.ruri_usr` is an error at the script's line (as writing one
//! always was), and `moonroute check` (`script::lint`) flags a misspelled hook or primitive
//! before a message reaches the line.
//!
//! Whether a name exists is never decided from these lists: the engine answers (an unknown
//! field reaches [`unknown_field`], the fallback `__index`), so a primitive added elsewhere
//! works without being listed here; the lists only feed suggestions and the lint's table of
//! where a decision is allowed.

use super::Role;

/// The hooks the engine calls (docs/scripting.md "Hooks"): the one list the engine's hook
/// metrics, the errors' suggestions and `moonroute check` all read.
pub const HOOKS: [&str; 6] = [
    "on_request",
    "on_reply",
    "on_failure",
    "on_branch",
    "on_dialog_end",
    "on_branch_failure",
];

/// Fields and methods of `req`/`res`/`branch`, for suggestions.
pub const MESSAGE_NAMES: &[&str] = &[
    // fields
    "method",
    "status",
    "reason",
    "ruri",
    "ruri_user",
    "ruri_host",
    "ruri_port",
    "from_uri",
    "from_user",
    "from_domain",
    "from_tag",
    "to_uri",
    "to_user",
    "to_domain",
    "to_tag",
    "call_id",
    "cseq",
    "cseq_method",
    "src_ip",
    "src_port",
    "transport",
    "body",
    "vars",
    "du",
    "branches",
    "branch",
    // methods
    "header",
    "headers",
    "has_to_tag",
    "is_method",
    "is_myself",
    "targets",
    "append_header",
    "set_header",
    "remove_header",
    "record_route",
    "loose_route",
    "follow_preloaded_route",
    "reply",
    "t_relay",
    "fork",
    "forward",
    "redirect",
    "drop",
    "lookup",
    "save",
    "authorize",
    "auth_challenge",
    "consume_credentials",
    "check_from",
    "nat_detect",
    "fix_nated_contact",
    "force_rport",
    "pike_check",
    "dlg_manage",
    "dlg_set_timeout",
    "dlg_known",
    "ds_select",
    "ds_next",
    "t_set_fr",
    "sanity",
];

/// Primitives allowed on `req` in some hooks only (`ScriptMsg::require`), with the roles that
/// may call them: the lint flags a call of one in another hook.
pub const RESTRICTED: &[(&str, &[Role])] = &[
    ("reply", &[Role::Request, Role::Failure]),
    ("forward", &[Role::Request]),
    ("redirect", &[Role::Request]),
    ("save", &[Role::Request]),
    ("t_relay", &[Role::Request, Role::Failure]),
    ("fork", &[Role::Request, Role::Failure]),
    ("lookup", &[Role::Request, Role::Failure]),
    ("ds_select", &[Role::Request, Role::Failure]),
    ("ds_next", &[Role::Failure]),
    ("t_set_fr", &[Role::Request, Role::Failure]),
    ("record_route", &[Role::Request]),
    ("loose_route", &[Role::Request]),
    ("follow_preloaded_route", &[Role::Request]),
    ("authorize", &[Role::Request]),
    ("auth_challenge", &[Role::Request]),
    ("consume_credentials", &[Role::Request]),
    ("check_from", &[Role::Request]),
    ("nat_detect", &[Role::Request]),
    ("force_rport", &[Role::Request]),
    ("pike_check", &[Role::Request]),
    ("dlg_manage", &[Role::Request]),
    ("dlg_set_timeout", &[Role::Request]),
    ("dlg_known", &[Role::Request]),
];

/// The object's name as scripts write it.
pub fn object_name(role: Role) -> &'static str {
    match role {
        Role::Response => "res",
        Role::Branch => "branch",
        _ => "req",
    }
}

/// The error for reading a field `key` that `req`/`res`/`branch` does not have.
pub fn unknown_field(role: Role, key: &mlua::Value) -> mlua::Error {
    let object = object_name(role);
    let Some(key) = key.as_string().map(|k| k.to_string_lossy()) else {
        return super::runtime(format!(
            "{object}[{}]: a message has named fields only",
            key.type_name()
        ));
    };
    let hint = did_you_mean(&key, MESSAGE_NAMES.iter().copied())
        .map(|s| format!(" (did you mean {object}.{s}?)"))
        .unwrap_or_default();
    super::runtime(format!("{object}.{key}: no such field or method{hint}"))
}

/// The closest of `candidates` to `name`, when close enough to be a typo (an edit distance
/// of at most a third of the name, at least 1).
pub fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, with a swap of two neighbours counted as one edit (`on_faliure`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_name() {
        assert_eq!(
            did_you_mean("on_faliure", HOOKS.iter().copied()),
            Some("on_failure")
        );
        assert_eq!(
            did_you_mean("ruri_usr", MESSAGE_NAMES.iter().copied()),
            Some("ruri_user")
        );
        assert_eq!(
            did_you_mean("sl_send_reply", MESSAGE_NAMES.iter().copied()),
            None
        );
        assert_eq!(
            did_you_mean("fromuser", MESSAGE_NAMES.iter().copied()),
            Some("from_user")
        );
    }

    /// Every listed name is one the engine knows (the other direction is the engine's own
    /// fallback `__index`).
    #[test]
    fn every_listed_name_exists() {
        let source = [
            include_str!("mod.rs"),
            include_str!("auth.rs"),
            include_str!("nat.rs"),
            include_str!("flood.rs"),
            include_str!("dialog.rs"),
            include_str!("dispatcher.rs"),
            include_str!("tm.rs"),
        ]
        .concat();
        for name in MESSAGE_NAMES
            .iter()
            .chain(RESTRICTED.iter().map(|(n, _)| n))
        {
            assert!(
                source.contains(&format!("\"{name}\"")),
                "{name} is not registered"
            );
        }
    }
}
