//! One compiled routing script in one Lua 5.4 state: the sandbox, the limits that stop a
//! runaway script, and calling its hooks with errors that name the script's file and line.
//!
//! A state is created in the event loop's own thread and never leaves it (mlua without the
//! `send` feature: no locks on the per-request path). Hot reload never patches a state: it
//! builds a fresh one from the new source, so no global of the old script survives.
//!
//! The sandbox loads `string`, `table`, `math`, `utf8`, `coroutine` and a reduced `os`
//! (`time`, `clock`, `date`, `difftime`). There is no `io`, `require`, `dofile` or `loadfile`:
//! a hook must never block its event loop on the file system, and a script is one file. Only
//! Lua source text is ever loaded (the script, and chunks given to `load`), never bytecode:
//! Lua does not verify bytecode, and a crafted binary chunk reads and writes memory outside
//! the VM, the classic escape from a Lua sandbox. So `string.dump` is removed too. The list
//! of what a script can reach is in docs/scripting.md ("The sandbox"), checked against the
//! state by a test.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use mlua::chunk::ChunkMode;
use mlua::thread::ThreadStatus;
use mlua::{
    Function, HookTriggers, IntoLuaMulti, Lua, LuaOptions, MultiValue, StdLib, Thread, Value,
    VmState,
};

use super::api;
use super::Services;
use crate::proxy::identity::LocalIdentity;

/// Instructions between two checks of the budget: small enough to stop a tight loop within
/// microseconds of its budget, large enough that the check costs nothing measurable.
const BUDGET_SLICE: u32 = 1000;

/// What stops a runaway script (config `[lua]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Lua VM instructions per hook call (and for the top-level code at load).
    pub max_instructions: u64,
    /// Bytes one Lua state may allocate.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instructions: 1_000_000,
            memory_bytes: 64 << 20,
        }
    }
}

impl From<&crate::config::Lua> for Limits {
    fn from(config: &crate::config::Lua) -> Limits {
        Limits {
            max_instructions: config.max_instructions,
            memory_bytes: config.memory_limit_mb << 20,
        }
    }
}

/// The text of one script version.
#[derive(Clone, Debug)]
pub struct ScriptSource {
    /// How errors name the file, e.g. `scripts/default.lua`.
    pub name: String,
    pub text: String,
    /// 1 for the script loaded at start, then one more for every accepted reload.
    pub version: u64,
}

/// Why a script could not be loaded or a hook failed: one line, starting with `file:line:`
/// whenever Lua knows where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptError(pub String);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

/// Where `sip.log` lines go: the tracing log (server), or a list (offline test runs).
#[derive(Clone, Default)]
pub enum LogSink {
    #[default]
    Tracing,
    Capture(Rc<RefCell<Vec<String>>>),
}

/// What a state needs from its surroundings.
#[derive(Clone)]
pub struct Env {
    pub identity: LocalIdentity,
    pub services: Arc<Services>,
    pub log: LogSink,
}

/// The hooks a script defines (§ "Entry points" of docs/scripting.md).
/// How a hook run by [`Engine::start`] stopped.
#[derive(Debug)]
pub enum Step {
    /// It returned.
    Finished,
    /// It called `sip.resolve` and waits for the answer to this query.
    Resolve(crate::dns::Query),
}

pub struct Hooks {
    pub on_request: Function,
    pub on_reply: Option<Function>,
    pub on_failure: Option<Function>,
    pub on_branch: Option<Function>,
    /// A tracked call ended (`crate::dialog`): the custom CDR sink.
    pub on_dialog_end: Option<Function>,
    /// One branch ended without a 2xx (Kamailio's `event_route[tm:branch-failure]`).
    pub on_branch_failure: Option<Function>,
}

/// A loaded script: its Lua state and hooks.
pub struct Engine {
    lua: Lua,
    hooks: Hooks,
    version: u64,
    name: Rc<str>,
    /// Budget slices left in the running call; the instruction hook counts it down.
    slices_left: Rc<Cell<u64>>,
    slices: u64,
    /// Finished coroutines kept for reuse (see [`Engine::recycle`]).
    spare_threads: RefCell<Vec<Thread>>,
}

/// Finished coroutines an engine keeps for reuse: one is enough for the request path (a hook
/// finishes before the next starts), a few more cover hooks suspended in `sip.resolve`.
const SPARE_THREADS: usize = 8;

impl Engine {
    /// Builds a fresh state, runs the script's top-level code (within the instruction budget)
    /// and checks that `on_request` is a function.
    pub fn load(source: &ScriptSource, limits: Limits, env: Env) -> Result<Engine, ScriptError> {
        let name: Rc<str> = Rc::from(source.name.as_str());
        let lua = new_state(&name, env).map_err(|e| describe(&e, &name))?;
        let slices = limits
            .max_instructions
            .div_ceil(u64::from(BUDGET_SLICE))
            .max(1);
        let slices_left = Rc::new(Cell::new(slices));
        install_budget(&lua, &slices_left, limits.max_instructions)
            .map_err(|e| describe(&e, &name))?;
        lua.set_memory_limit(limits.memory_bytes)
            .map_err(|e| describe(&e, &name))?;
        lua.load(source.text.as_str())
            .set_name(format!("@{}", source.name))
            .set_mode(ChunkMode::Text)
            .exec()
            .map_err(|e| describe(&e, &name))?;
        let hooks = find_hooks(&lua, &name)?;
        Ok(Engine {
            lua,
            hooks,
            version: source.version,
            name,
            slices_left,
            slices,
            spare_threads: RefCell::new(Vec::new()),
        })
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls a hook with a fresh instruction budget.
    pub fn call(&self, hook: &Function, args: impl IntoLuaMulti) -> Result<(), ScriptError> {
        self.slices_left.set(self.slices);
        hook.call::<Value>(args)
            .map(drop)
            .map_err(|e| describe(&e, &self.name))
    }

    /// Bytes the state uses now.
    /// Runs `hook` in a coroutine of its own, so that `sip.resolve` can suspend it until its
    /// DNS answer arrives ([`Engine::resume`]). The instruction budget covers this run.
    pub fn start(
        &self,
        hook: &Function,
        args: impl IntoLuaMulti,
    ) -> Result<(Step, Thread), ScriptError> {
        let spare = self.spare_threads.borrow_mut().pop();
        let thread = match spare {
            Some(thread) => thread.reset(hook.clone()).map(|()| thread),
            None => self.lua.create_thread(hook.clone()),
        }
        .map_err(|e| describe(&e, &self.name))?;
        let step = self.resume(&thread, args)?;
        Ok((step, thread))
    }

    /// Gives back the coroutine of a hook that returned, for [`Engine::start`] to reuse:
    /// resetting one costs a fraction of creating one.
    pub fn recycle(&self, thread: Thread) {
        let mut spare = self.spare_threads.borrow_mut();
        if spare.len() < SPARE_THREADS && thread.status() == ThreadStatus::Finished {
            spare.push(thread);
        }
    }

    /// Continues a hook [`Engine::start`] left suspended, with `args` as what `sip.resolve`
    /// returns. The instruction budget starts afresh: waiting cost the script nothing.
    pub fn resume(&self, thread: &Thread, args: impl IntoLuaMulti) -> Result<Step, ScriptError> {
        self.slices_left.set(self.slices);
        let yielded = thread
            .resume::<MultiValue>(args)
            .map_err(|e| describe(&e, &self.name))?;
        if thread.status() != ThreadStatus::Resumable {
            return Ok(Step::Finished);
        }
        match yielded.front() {
            Some(Value::UserData(ud)) => match ud.borrow::<api::ResolveRequest>() {
                Ok(request) => Ok(Step::Resolve(request.0.clone())),
                Err(_) => Err(self.stray_yield()),
            },
            _ => Err(self.stray_yield()),
        }
    }

    fn stray_yield(&self) -> ScriptError {
        ScriptError(format!(
            "{}: the hook yielded (coroutine.yield) outside sip.resolve",
            self.name
        ))
    }

    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }
}

fn new_state(name: &Rc<str>, env: Env) -> mlua::Result<Lua> {
    let libs = StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::MATH
        | StdLib::OS;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    let globals = lua.globals();
    let os: mlua::Table = globals.get("os")?;
    for unsafe_fn in [
        "execute",
        "exit",
        "getenv",
        "remove",
        "rename",
        "tmpname",
        "setlocale",
    ] {
        os.set(unsafe_fn, Value::Nil)?;
    }
    // `warn` would do nothing (the state has no warning function): sip.log("warn", ...) logs.
    for removed in ["dofile", "loadfile", "warn"] {
        globals.set(removed, Value::Nil)?;
    }
    // The only way to make bytecode, which `load` would refuse anyway.
    globals
        .get::<mlua::Table>("string")?
        .set("dump", Value::Nil)?;
    load_text_only(&lua)?;
    api::install(&lua, name.clone(), env)?;
    Ok(lua)
}

/// Replaces `load` with one that loads text chunks only: the base library's `load` with its
/// `mode` argument forced to `"t"`. Lua checks the mode on the chunk's first byte, so this
/// holds for a string and for a reader function alike; a binary chunk gets `nil` and
/// "attempt to load a binary chunk (mode is 't')", as from any `load` refusing a mode.
///
/// The replacement is Lua, so that it behaves as `load` in every other way: its arguments are
/// checked first, with Lua's messages at the caller's line (the real `load` then raises
/// nothing: a reader's errors are returned, not raised), and the count of arguments is kept,
/// since an `env` given as nil (a chunk without globals) differs from no `env`.
fn load_text_only(lua: &Lua) -> mlua::Result<()> {
    const TEXT_ONLY: &str = r#"
        local load, type, error = ...
        local function check_optional_string(value, position)
          local kind = type(value)
          if value ~= nil and kind ~= "string" and kind ~= "number" then
            error(("bad argument #%d to 'load' (string expected, got %s)"):format(position, kind), 3)
          end
        end
        return function(chunk, chunkname, mode, ...)
          check_optional_string(mode, 3)
          check_optional_string(chunkname, 2)
          local kind = type(chunk)
          if kind ~= "string" and kind ~= "number" and kind ~= "function" then
            error(("bad argument #1 to 'load' (function expected, got %s)"):format(kind), 2)
          end
          return load(chunk, chunkname, "t", ...)
        end
    "#;
    let globals = lua.globals();
    let text_only: Function = lua.load(TEXT_ONLY).set_name("=load").call((
        globals.get::<Function>("load")?,
        globals.get::<Function>("type")?,
        globals.get::<Function>("error")?,
    ))?;
    globals.set("load", text_only)
}

/// Counts instructions in slices of [`BUDGET_SLICE`] and stops the call that overruns.
fn install_budget(lua: &Lua, slices_left: &Rc<Cell<u64>>, max: u64) -> mlua::Result<()> {
    let left = slices_left.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(BUDGET_SLICE),
        move |_lua, debug| {
            let remaining = left.get().saturating_sub(1);
            left.set(remaining);
            if remaining > 0 {
                return Ok(VmState::Continue);
            }
            let source = debug.source();
            let place = match (source.short_src, debug.current_line()) {
                (Some(src), Some(line)) => format!("{src}:{line}: "),
                _ => String::new(),
            };
            Err(mlua::Error::runtime(format!(
                "{place}instruction budget exceeded ({max} instructions; [lua] max_instructions)"
            )))
        },
    )
}

fn find_hooks(lua: &Lua, name: &str) -> Result<Hooks, ScriptError> {
    let globals = lua.globals();
    let hook = |hook: &str| -> Result<Option<Function>, ScriptError> {
        match globals.get::<Value>(hook) {
            Ok(Value::Function(f)) => Ok(Some(f)),
            Ok(Value::Nil) => Ok(None),
            Ok(other) => Err(ScriptError(format!(
                "{name}: {hook} must be a function, not a {}",
                other.type_name()
            ))),
            Err(e) => Err(describe(&e, name)),
        }
    };
    let on_request = hook("on_request")?.ok_or_else(|| {
        ScriptError(format!(
            "{name}: on_request is not defined (every script needs `function on_request(req)`)"
        ))
    })?;
    Ok(Hooks {
        on_request,
        on_reply: hook("on_reply")?,
        on_failure: hook("on_failure")?,
        on_branch: hook("on_branch")?,
        on_dialog_end: hook("on_dialog_end")?,
        on_branch_failure: hook("on_branch_failure")?,
    })
}

/// One line for an mlua error, starting with `file:line:` when it can be found: Lua's own
/// errors carry it; errors raised in Rust callbacks get it from the traceback.
pub fn describe(error: &mlua::Error, script: &str) -> ScriptError {
    ScriptError(describe_text(error, script))
}

fn describe_text(error: &mlua::Error, script: &str) -> String {
    let (cause, traceback) = innermost(error);
    let message = match cause {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::MemoryError(m) => format!("out of memory ([lua] memory_limit_mb): {m}"),
        other => other.to_string(),
    };
    let message = message.lines().next().unwrap_or_default().trim().to_owned();
    let located = message.starts_with(script)
        || message
            .split(':')
            .nth(1)
            .is_some_and(|l| l.parse::<u32>().is_ok());
    if located {
        return message;
    }
    match traceback.and_then(|t| location_in(t, script)) {
        Some(place) => format!("{place}: {message}"),
        None => format!("{script}: {message}"),
    }
}

fn innermost(error: &mlua::Error) -> (&mlua::Error, Option<&str>) {
    let mut current = error;
    let mut traceback = None;
    loop {
        match current {
            mlua::Error::CallbackError {
                cause,
                traceback: t,
            } => {
                traceback.get_or_insert(t.as_str());
                current = cause;
            }
            mlua::Error::WithContext { cause, .. } => current = cause,
            other => return (other, traceback),
        }
    }
}

/// The first `script:line` in a Lua traceback: the script's line that called into Rust.
fn location_in(traceback: &str, script: &str) -> Option<String> {
    traceback.lines().find_map(|line| {
        let line = line.trim();
        let rest = line.strip_prefix(script)?.strip_prefix(':')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (!digits.is_empty()).then(|| format!("{script}:{digits}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn engine(text: &str) -> Engine {
        let env = Env {
            identity: LocalIdentity::default(),
            services: Arc::new(Services::default()),
            log: LogSink::Tracing,
        };
        let source = ScriptSource {
            name: "sandbox.lua".into(),
            text: text.into(),
            version: 1,
        };
        Engine::load(&source, Limits::default(), env).expect("the script loads")
    }

    /// A real binary chunk of this Lua, made outside the sandbox (where it loads and runs).
    fn bytecode() -> Vec<u8> {
        let free = Lua::new();
        let chunk: mlua::LuaString = free
            .load("return string.dump(function() return 'escaped' end)")
            .eval()
            .unwrap();
        let chunk = chunk.as_bytes().to_vec();
        let ran: String = free
            .load(&chunk[..])
            .set_mode(ChunkMode::Binary)
            .call(())
            .unwrap();
        assert_eq!(ran, "escaped");
        chunk
    }

    #[test]
    fn load_refuses_binary_chunks_whatever_mode_or_reader() {
        let engine = engine("function on_request(req) end");
        let lua = engine.lua();
        lua.globals()
            .set("BYTES", lua.create_string(bytecode()).unwrap())
            .unwrap();
        let refusals: Vec<String> = lua
            .load(
                r#"
                local function bytewise()
                  local i = 0
                  return function()
                    i = i + 1
                    return i <= #BYTES and BYTES:sub(i, i) or nil
                  end
                end
                local out = {}
                for _, attempt in ipairs {
                  function() return load(BYTES) end,
                  function() return load(BYTES, "=x", "b") end,
                  function() return load(BYTES, "=x", "bt", {}) end,
                  function() return load(bytewise(), "=x", "b") end,
                } do
                  local chunk, message = attempt()
                  out[#out + 1] = tostring(chunk) .. " " .. message
                end
                return out
                "#,
            )
            .eval()
            .unwrap();
        assert_eq!(
            refusals,
            vec!["nil attempt to load a binary chunk (mode is 't')"; 4]
        );
        let gone: bool = lua
            .load("return string.dump == nil and ('').dump == nil and warn == nil")
            .eval()
            .unwrap();
        assert!(gone, "string.dump and warn are removed");
    }

    #[test]
    fn load_still_takes_text_as_lua_does() {
        let engine = engine("function on_request(req) end\nX = 7\n");
        let results: Vec<String> = engine
            .lua()
            .load(
                r#"
                local reader_done = false
                return {
                  -- The mode asked for is ignored: text is text.
                  tostring(load("return X", "=c", "b")()),
                  -- An env table, and an env given as nil (a chunk without globals).
                  tostring(load("return X", "=c", "t", {X = 5})()),
                  tostring(select(2, pcall(load("return X", "=c", "t", nil)))),
                  -- A reader function, the chunk name in errors, syntax errors.
                  tostring(load(function()
                    if reader_done then return nil end
                    reader_done = true
                    return "return 'read'"
                  end)()),
                  tostring(select(2, pcall(load("error('e')", "=named")))),
                  tostring(select(2, load("x x", "=named"))),
                  -- Wrong arguments: Lua's messages, at the caller's line.
                  tostring(select(2, pcall(load, {}))),
                  tostring(select(2, pcall(load("load('x', {})", "=caller")))),
                  tostring(select(2, pcall(load("load('x', 'n', true)", "=caller")))),
                  -- A reader's error is returned (with the position and traceback the
                  -- host's message handler gives any error).
                  select(2, load(function() error("reader failed") end)):match("reader failed"),
                }
                "#,
            )
            .eval()
            .unwrap();
        assert_eq!(
            results,
            [
                "7",
                "5",
                "c:1: attempt to index a nil value (upvalue '_ENV')",
                "read",
                "named:1: e",
                "named:1: syntax error near 'x'",
                "bad argument #1 to 'load' (function expected, got table)",
                "caller:1: bad argument #2 to 'load' (string expected, got table)",
                "caller:1: bad argument #3 to 'load' (string expected, got boolean)",
                "reader failed",
            ]
        );
    }

    /// What docs/scripting.md "The sandbox" lists: the names in backquotes of its table rows,
    /// each row's first cell naming a table (`globals` for the globals).
    fn documented() -> BTreeSet<String> {
        let doc = include_str!("../../docs/scripting.md");
        let start = doc.find("\n### The sandbox\n").expect("a sandbox section");
        let section = &doc[start + 1..];
        let end = section[4..].find("\n#").map_or(section.len(), |e| e + 4);
        let mut names = BTreeSet::new();
        for row in section[..end].lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (Some(table), Some(members)) = (cells.get(1), cells.get(2)) else {
                continue;
            };
            // The header and separator rows name no table in backquotes.
            let prefix = match table.strip_prefix('`').and_then(|t| t.strip_suffix('`')) {
                _ if *table == "globals" => String::new(),
                Some(name) => {
                    names.insert(name.to_owned());
                    format!("{name}.")
                }
                None => continue,
            };
            let identifiers = members.split('`').skip(1).step_by(2).filter(|name| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            names.extend(identifiers.map(|name| format!("{prefix}{name}")));
        }
        names
    }

    #[test]
    fn the_sandbox_is_exactly_what_the_docs_list() {
        let engine = engine("function on_request(req) end");
        let present: Vec<String> = engine
            .lua()
            .load(
                r#"
                local names = {}
                local function walk(prefix, t, depth)
                  for key, value in pairs(t) do
                    local name = prefix .. key
                    if name ~= "on_request" and name ~= "_G" then
                      names[#names + 1] = name
                      if type(value) == "table" and depth < 3 then
                        walk(name .. ".", value, depth + 1)
                      end
                    end
                  end
                end
                walk("", _G, 1)
                names[#names + 1] = "_G"
                return names
                "#,
            )
            .eval()
            .unwrap();
        let present: BTreeSet<String> = present.into_iter().collect();
        let documented = documented();
        let undocumented: Vec<_> = present.difference(&documented).collect();
        let missing: Vec<_> = documented.difference(&present).collect();
        assert!(
            undocumented.is_empty() && missing.is_empty(),
            "in the state but not in docs/scripting.md: {undocumented:?}\n\
             in docs/scripting.md but not in the state: {missing:?}"
        );
    }
}
