//! The documentation's Lua, run: every `lua` block of docs/scripting.md, of README.md and of
//! the docs that show Lua parses (Lua 5.4, with the `...` that stands for elided code taken
//! out), every block that is a whole script (it defines `on_request`) passes `moonroute check`
//! (load and lint), and the failure-routing recipes route as the docs say, with branch
//! outcomes fed offline (`moonroute::script::offline::Session`).

use std::path::Path;

use moonroute::script::offline::{self, Feed, Fixtures, Outcome, Session, TestOptions};
use moonroute::script::ScriptSource;

const DOC: &str = include_str!("../docs/scripting.md");

/// The documents whose Lua is checked: the API reference, and the others that show Lua.
const DOCS: [(&str, &str); 4] = [
    ("docs/scripting.md", DOC),
    ("README.md", include_str!("../README.md")),
    (
        "docs/routing-scripts.md",
        include_str!("../docs/routing-scripts.md"),
    ),
    ("docs/first-call.md", include_str!("../docs/first-call.md")),
];

/// The `lua` blocks of the documents, each with where it starts (`FILE:LINE`).
fn lua_blocks() -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    for (file, text) in DOCS {
        let mut current: Option<(String, String)> = None;
        for (number, line) in text.lines().enumerate() {
            match (&mut current, line.trim_end()) {
                (None, "```lua") => {
                    current = Some((format!("{file}:{}", number + 2), String::new()))
                }
                (Some(_), "```") => blocks.extend(current.take()),
                (Some((_, block)), line) => {
                    block.push_str(line);
                    block.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    blocks
}

/// A block with its elisions (`...` standing for code, alone or ending a line) commented out.
fn without_elisions(block: &str) -> String {
    block
        .lines()
        .map(|line| {
            let trimmed = line.trim_end();
            if trimmed.trim_start() == "..." {
                "-- ...".to_owned()
            } else if let Some(head) = trimmed.strip_suffix(", ...}") {
                format!("{head}}}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_lua_block_parses() {
    let blocks = lua_blocks();
    assert!(blocks.len() > 40, "{} blocks", blocks.len());
    let mut broken = Vec::new();
    for (at, block) in &blocks {
        let text = without_elisions(block);
        if let Err(errors) =
            full_moon::parse_fallible(&text, full_moon::LuaVersion::lua54()).into_result()
        {
            broken.push(format!("{at}: {}", errors[0]));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn every_whole_script_passes_check() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut failed = Vec::new();
    let mut checked = 0;
    for (index, (at, block)) in lua_blocks().into_iter().enumerate() {
        if !block.contains("function on_request(") {
            continue;
        }
        let path = dir.path().join(format!("block_{index}.lua"));
        std::fs::write(&path, without_elisions(&block)).unwrap();
        checked += 1;
        if let Err(error) = offline::check(&path) {
            failed.push(format!("{at}: {error}"));
        }
    }
    assert!(checked >= 5, "{checked} scripts");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The block that starts with `-- recipe: NAME`.
fn recipe(name: &str) -> ScriptSource {
    let marker = format!("-- recipe: {name}\n");
    let (_, text) = lua_blocks()
        .into_iter()
        .find(|(_, block)| block.starts_with(&marker))
        .unwrap_or_else(|| panic!("no recipe {name} in docs/scripting.md"));
    ScriptSource {
        name: format!("recipe {name}"),
        text,
        version: 1,
    }
}

const INVITE: &str = "INVITE sip:{user}@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-recipe\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@127.0.0.1:5060>;tag=a1\r\n\
To: <sip:{user}@127.0.0.1:5060>\r\n\
Call-ID: recipe@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

fn fed(script: &ScriptSource, location: Option<&str>, user: &str, feed: &[Feed]) -> Outcome {
    let options = TestOptions::default();
    let fixtures = Fixtures {
        location,
        subscribers: None,
    };
    let mut session = Session::new(script, &fixtures, &options).unwrap();
    let message = INVITE.replace("{user}", user);
    let outcome = session.run(message.as_bytes(), &options, feed).unwrap();
    assert_eq!(outcome.error, None);
    assert!(outcome.hook_errors.is_empty(), "{:?}", outcome.hook_errors);
    outcome
}

#[test]
fn the_voicemail_recipe() {
    let script = recipe("voicemail");
    let location = "sip:bob@127.0.0.1:5060 sip:bob@127.0.0.1:5080\n\
                    sip:bob@127.0.0.1:5060 sip:bob@127.0.0.1:5081\n";
    let vm = "sip:vm@127.0.0.1:5090";
    for (busy_or_silent, feed) in [
        (
            "busy",
            [Feed::Responses(vec![180, 486]), Feed::Timeout(vec![])],
        ),
        (
            "no answer",
            [Feed::Timeout(vec![180]), Feed::Timeout(vec![])],
        ),
        (
            "Timer C",
            [Feed::Responses(vec![180, 487]), Feed::Responses(vec![487])],
        ),
        (
            "unavailable",
            [Feed::Responses(vec![480]), Feed::Responses(vec![480])],
        ),
    ] {
        let mut feed = feed.to_vec();
        feed.push(Feed::Responses(vec![200]));
        let o = fed(&script, Some(location), "bob", &feed);
        assert_eq!(o.failures.len(), 1, "{busy_or_silent}");
        assert_eq!(o.failures[0].targets, [vm], "{busy_or_silent}");
        assert_eq!(o.branches[2].target, vm);
        assert_eq!(o.final_code, Some(200));
    }
    // Voicemail busy too: the caller gets the 486, no loop.
    let o = fed(
        &script,
        Some(location),
        "bob",
        &[
            Feed::Responses(vec![486]),
            Feed::Responses(vec![486]),
            Feed::Responses(vec![486]),
        ],
    );
    assert_eq!((o.failures.len(), o.final_code), (2, Some(486)));
    // Declined (603): not voicemail's business.
    let o = fed(
        &script,
        Some(location),
        "bob",
        &[Feed::Responses(vec![603]), Feed::Responses(vec![486])],
    );
    assert!(o.failures[0].targets.is_empty());
    // Not registered: voicemail at once.
    let o = fed(&script, None, "carol", &[Feed::Responses(vec![200])]);
    assert_eq!(o.targets[0].0, vm);
}

#[test]
fn the_gateway_recipe() {
    let script = recipe("gateways");
    let gw = |n: u16| format!("sip:+33123456789@127.0.0.1:{}", 5090 + n);
    let o = fed(
        &script,
        None,
        "+33123456789",
        &[Feed::Responses(vec![503]), Feed::Responses(vec![200])],
    );
    assert_eq!(o.targets[0].0, gw(1));
    assert_eq!(o.failures[0].targets, [gw(2)]);
    assert_eq!(o.final_code, Some(200));
    let o = fed(
        &script,
        None,
        "+33123456789",
        &[Feed::Timeout(vec![100]), Feed::Timeout(vec![])],
    );
    assert_eq!(o.failures.len(), 2);
    assert_eq!(o.final_code, Some(408));
    let o = fed(&script, None, "+33123456789", &[Feed::Responses(vec![486])]);
    assert!(o.failures[0].targets.is_empty());
    assert_eq!(o.final_code, Some(486));
    let o = fed(&script, None, "bob", &[]);
    assert_eq!(o.code, Some(404));
}

#[test]
fn the_example_policies_pass_check_and_their_tests() {
    for name in ["pbx", "office_hours", "rate_limit"] {
        let script = format!("examples/scripts/{name}.lua");
        offline::check(Path::new(&script)).unwrap_or_else(|e| panic!("{script}: {e}"));
        let test = format!("examples/scripts/{name}_test.lua");
        let report = offline::run_lua_tests(Path::new(&test)).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.contains(": ok ("), "{report}");
    }
}
