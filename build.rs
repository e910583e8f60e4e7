//! Build-time facts for `moonroute --version`: the release of the Lua the binary embeds, and
//! the git commit when the build runs in a git checkout.
//!
//! mlua exposes only `LUA_VERSION_NUM` (504) and `_VERSION` ("Lua 5.4"); the full release
//! ("5.4.9") is a macro of the vendored `lua.h`, whose directory mlua-sys (`links = "lua"`)
//! passes to this script as `DEP_LUA_INCLUDE`. No new crate is involved.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LUA_INCLUDE");
    println!("cargo:rustc-env=MOONROUTE_LUA_RELEASE={}", lua_release());
    println!(
        "cargo:rustc-env=MOONROUTE_GIT_COMMIT={}",
        git_commit().unwrap_or_default()
    );
}

/// `major.minor.release` from the vendored `lua.h`, or "5.4" when it cannot be read (a system
/// Lua found by pkg-config gives no include directory).
fn lua_release() -> String {
    let header = std::env::var_os("DEP_LUA_INCLUDE").map(|dir| PathBuf::from(dir).join("lua.h"));
    header
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| release_from_header(&text))
        .unwrap_or_else(|| "5.4".to_owned())
}

/// Reads `#define LUA_VERSION_MAJOR "5"` and its MINOR and RELEASE siblings.
fn release_from_header(text: &str) -> Option<String> {
    let define = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("#define")?.trim_start();
            let value = rest.strip_prefix(name)?;
            // Not LUA_VERSION_RELEASE_NUM when asking for LUA_VERSION_RELEASE.
            if !value.starts_with([' ', '\t']) {
                return None;
            }
            let digits = value.trim().trim_matches('"');
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.to_owned())
        })
    };
    Some(format!(
        "{}.{}.{}",
        define("LUA_VERSION_MAJOR")?,
        define("LUA_VERSION_MINOR")?,
        define("LUA_VERSION_RELEASE")?
    ))
}

/// The short hash of HEAD, when this is a git checkout with `git` installed (a source tarball
/// or a Docker build context without `.git` gives none). Rebuilds when HEAD moves.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let output = Command::new("git").args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // HEAD names a branch whose ref file (or packed-refs) moves with each commit; in a
    // worktree these live in two different directories.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|name| git(&["rev-parse", "--git-path", &name])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
