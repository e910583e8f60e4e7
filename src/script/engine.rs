//! One compiled routing script in one Lua 5.4 state: the sandbox, the limits that stop a
//! runaway script, and calling its hooks with errors that name the script's file and line.
//!
//! A state is created in the event loop's own thread and never leaves it (mlua without the
//! `send` feature: no locks on the per-request path). Hot reload never patches a state: it
//! builds a fresh one from the new source, so no global of the old script survives.
//!
//! The sandbox loads `string`, `table`, `math`, `utf8`, `coroutine` and a reduced `os`
//! (`time`, `clock`, `date`, `difftime`). There is no `io`, `require`, `dofile` or `loadfile`:
//! a hook must never block its event loop on the file system, and a script is one file.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use mlua::thread::ThreadStatus;
use mlua::{
    Function, HookTriggers, IntoLuaMulti, Lua, LuaOptions, MultiValue, StdLib, Thread, Value,
    VmState,
};

use super::api;
use super::Services;
use crate::server::core::LocalIdentity;

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
    for blocking in ["dofile", "loadfile"] {
        globals.set(blocking, Value::Nil)?;
    }
    api::install(&lua, name.clone(), env)?;
    Ok(lua)
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
