//! `moonroute ctl user ...`: the subscriber table (Kamailio's `kamctl add|rm|show`).
//!
//! - `user add USER@DOMAIN [PASSWORD] [--realm REALM]`: adds or replaces a subscriber. The
//!   password, when not an argument, is read from standard input (so it stays out of shell
//!   history). The **client** computes the HA1 values (RFC 2617 §3.2.2.2, MD5 and SHA-256)
//!   and sends only them: the server, its socket and its disk never see the password. REALM
//!   defaults to DOMAIN.
//! - `user rm USER@DOMAIN`;
//! - `user list`: one `USER@DOMAIN realm=REALM` line per subscriber (never the HA1s).
//!
//! On the socket `add` travels as `user add USER@DOMAIN REALM HA1-MD5 HA1-SHA256`
//! ([`client_args`] turns the first form into it; [`command`] serves the second).

use super::Reply;
use crate::auth::subscriber::split_user;
use crate::auth::{Authenticator, Subscriber};

/// The `user` commands, for usage and error messages.
pub const USAGE: &str =
    "user add USER@DOMAIN [PASSWORD] [--realm REALM] | user rm USER@DOMAIN | user list";

/// Rewrites a `user add` command line into what is sent: the HA1s instead of the password,
/// which `read_password` supplies when it is not an argument. Other commands pass unchanged.
pub fn client_args(
    args: &[String],
    read_password: impl FnOnce() -> std::io::Result<String>,
) -> Result<Vec<String>, String> {
    if args.first().map(String::as_str) != Some("user")
        || args.get(1).map(String::as_str) != Some("add")
    {
        return Ok(args.to_vec());
    }
    let mut positional = Vec::new();
    let mut realm = None;
    let mut rest = args[2..].iter();
    while let Some(arg) = rest.next() {
        if arg == "--realm" {
            realm = Some(rest.next().ok_or("--realm needs a value")?.clone());
        } else if let Some(value) = arg.strip_prefix("--realm=") {
            realm = Some(value.to_owned());
        } else {
            positional.push(arg.clone());
        }
    }
    let (user_at_domain, password) = match positional.as_slice() {
        [user] => (user.clone(), None),
        [user, password] => (user.clone(), Some(password.clone())),
        _ => return Err(format!("usage: {USAGE}")),
    };
    let (user, domain) = split_user(&user_at_domain)?;
    let password = match password {
        Some(password) => password,
        None => {
            let line = read_password().map_err(|e| format!("cannot read the password: {e}"))?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        return Err("the password is empty".to_owned());
    }
    let realm = realm.unwrap_or_else(|| domain.clone());
    let subscriber = Subscriber::with_password(&user, &realm, &password);
    subscriber.validate()?;
    Ok(vec![
        "user".into(),
        "add".into(),
        format!("{user}@{domain}"),
        realm,
        subscriber.ha1_md5,
        subscriber.ha1_sha256,
    ])
}

/// Runs `user ARGS...` on the server (`args` after `user`).
pub fn command(args: &[String], auth: &Authenticator) -> Reply {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let table = auth.subscribers();
    let result = match args.as_slice() {
        ["add", user, realm, md5, sha256] => {
            let subscriber = Subscriber {
                realm: (*realm).to_owned(),
                ha1_md5: (*md5).to_owned(),
                ha1_sha256: (*sha256).to_owned(),
            };
            table.add(user, &subscriber).map(|replaced| {
                let (name, domain) = split_user(user).unwrap_or_default();
                let verb = if replaced { "replaced" } else { "added" };
                format!("{name}@{domain} {verb} (realm {realm})")
            })
        }
        ["rm", user] => match table.remove(user) {
            Ok(true) => Ok(format!("{user} removed")),
            Ok(false) => Err(format!("{user} not found")),
            Err(e) => Err(e),
        },
        ["list"] => {
            let list = table.list();
            if list.is_empty() {
                Ok("no subscribers".to_owned())
            } else {
                Ok(list
                    .iter()
                    .map(|(user, realm)| format!("{user} realm={realm}\n"))
                    .collect())
            }
        }
        _ => Err(format!("usage: {USAGE}")),
    };
    match result {
        Ok(text) => Reply::ok(text),
        Err(text) => Reply::error(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_client_sends_ha1s_never_the_password() {
        let sent = client_args(
            &strings(&["user", "add", "alice@Example.com", "pw"]),
            || panic!("not asked"),
        )
        .unwrap();
        let expected = Subscriber::with_password("alice", "example.com", "pw");
        assert_eq!(
            sent,
            strings(&[
                "user",
                "add",
                "alice@example.com",
                "example.com",
                &expected.ha1_md5,
                &expected.ha1_sha256
            ])
        );
        // From stdin, with a realm.
        let sent = client_args(
            &strings(&["user", "add", "bob@example.com", "--realm", "voip"]),
            || Ok("hunter2\n".to_owned()),
        )
        .unwrap();
        assert_eq!(sent[3], "voip");
        assert_eq!(
            sent[4],
            Subscriber::with_password("bob", "voip", "hunter2").ha1_md5
        );
        assert!(!sent.iter().any(|a| a.contains("hunter2")));
        // Other commands pass through.
        let ul = strings(&["ul", "show"]);
        assert_eq!(client_args(&ul, || panic!()).unwrap(), ul);
        assert!(client_args(&strings(&["user", "add"]), || panic!()).is_err());
        assert!(client_args(&strings(&["user", "add", "nodomain", "pw"]), || panic!()).is_err());
        assert!(client_args(&strings(&["user", "add", "a@b"]), || Ok("\n".into())).is_err());
    }

    #[test]
    fn add_list_rm_on_the_server() {
        let dir = tempfile::TempDir::new().unwrap();
        let settings = crate::config::Auth::default().settings(Vec::new());
        let auth = crate::auth::open(&settings, dir.path()).unwrap();
        let args = client_args(
            &strings(&["user", "add", "alice@example.com", "pw"]),
            || panic!(),
        )
        .unwrap();
        let reply = command(&args[1..], &auth);
        assert!(reply.ok, "{}", reply.text);
        assert_eq!(
            auth.subscribers().find("alice", "example.com"),
            Some(Subscriber::with_password("alice", "example.com", "pw"))
        );
        let list = command(&strings(&["list"]), &auth);
        assert_eq!(list.text, "alice@example.com realm=example.com\n");
        assert!(command(&strings(&["rm", "alice@example.com"]), &auth).ok);
        assert!(!command(&strings(&["rm", "alice@example.com"]), &auth).ok);
        assert_eq!(command(&strings(&["list"]), &auth).text, "no subscribers");
        let bad = command(&strings(&["add", "a@b", "r", "zz", "zz"]), &auth);
        assert!(!bad.ok);
    }
}
