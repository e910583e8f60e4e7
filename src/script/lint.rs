//! `moonroute check`'s static pass: mistakes a script only reveals when a message reaches the
//! line, found in its syntax tree (full_moon, Lua 5.4) before it goes live:
//!
//! - a function named like a hook that the engine never calls (`on_faliure`, "did you mean
//!   on_failure?");
//! - a field or method of a hook's message parameter that does not exist
//!   (`req:sl_send_reply(...)`, `req.ruri_usr`), or a `sip.` name that does not exist
//!   (`sip.kv.increment`);
//! - a primitive called in a hook where it is not available (`req:reply` in `on_reply`);
//! - a second decision on a path that did not return after the first (`if ... then
//!   req:reply(403) end req:t_relay()`): the engine refuses it at run time (one decision per
//!   call, docs/scripting.md).
//!
//! Whether a name exists is asked of the loaded engine ([`Names`]), not of a list here, so
//! the lint follows the API. The pass sees the hooks' own bodies: a helper function called
//! from a hook is checked for names, not for where it is called from.

use full_moon::ast::{self, Block, Call, Expression, Index, LastStmt, Prefix, Stmt, Suffix};
use full_moon::node::Node;
use full_moon::tokenizer::TokenReference;
use full_moon::visitors::{Visit, Visitor};

use super::api::names::{did_you_mean, object_name, HOOKS, MESSAGE_NAMES, RESTRICTED};
use super::api::Role;

/// What the loaded engine knows, asked by the lint.
pub trait Names {
    /// Whether `req`/`res`/`branch` have a field or method `name`.
    fn message_has(&self, name: &str) -> bool;
    /// The keys of the `sip` namespace at `path` (`[]` is `sip` itself), or `None` when that
    /// value is not a namespace whose keys can be listed (data, a userdata, absent).
    fn sip_keys(&self, path: &[String]) -> Option<Vec<String>>;
}

/// One mistake, at a line of the script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub line: usize,
    pub message: String,
}

/// Primitives that decide what happens to the request (one per hook call).
const DECISIONS: &[&str] = &[
    "reply", "t_relay", "fork", "forward", "redirect", "drop", "save",
];

/// The findings for `text`, sorted by line; a script that does not parse has none here (the
/// load reports its syntax error).
pub fn lint(text: &str, names: &dyn Names) -> Vec<Finding> {
    let Ok(ast) = full_moon::parse_fallible(text, full_moon::LuaVersion::lua54()).into_result()
    else {
        return Vec::new();
    };
    let mut findings = Vec::new();
    for stmt in ast.nodes().stmts() {
        let Stmt::FunctionDeclaration(declaration) = stmt else {
            continue;
        };
        let name = declaration.name();
        let parts: Vec<String> = name.names().iter().map(text_of).collect();
        if parts.len() != 1 || name.method_name().is_some() {
            continue;
        }
        let hook = parts[0].as_str();
        let line = line_of(declaration.as_ref());
        if !HOOKS.contains(&hook) {
            if let Some(meant) = did_you_mean(hook, HOOKS.iter().copied()) {
                findings.push(Finding {
                    line,
                    message: format!(
                        "function {hook} is not a hook the engine calls (did you mean {meant}?)"
                    ),
                });
            } else if hook.starts_with("on_") {
                findings.push(Finding {
                    line,
                    message: format!(
                        "function {hook} is not a hook the engine calls (the hooks: {})",
                        HOOKS.join(", ")
                    ),
                });
            }
            continue;
        }
        let params: Vec<String> = declaration
            .body()
            .parameters()
            .iter()
            .filter_map(|p| match p {
                ast::Parameter::Name(token) => Some(text_of(token)),
                _ => None,
            })
            .collect();
        let roles = hook_roles(hook);
        let objects: Vec<(String, Role)> = params.into_iter().zip(roles.iter().copied()).collect();
        let block = declaration.body().block();
        let mut uses = Uses {
            objects: &objects,
            names,
            hook,
            findings: &mut findings,
        };
        block.visit(&mut uses);
        if let Some((req, _)) = objects.iter().find(|(_, r)| *r != Role::Response) {
            let mut paths = Paths {
                req,
                findings: &mut findings,
            };
            paths.block(block, None);
        }
    }
    // The sip names anywhere in the script (top level and helpers included).
    let mut sip = SipNames {
        names,
        findings: &mut findings,
    };
    ast.nodes().visit(&mut sip);
    findings.sort_by_key(|f| f.line);
    findings.dedup();
    findings
}

/// The roles of a hook's parameters, in order (docs/scripting.md "Hooks").
fn hook_roles(hook: &str) -> &'static [Role] {
    match hook {
        "on_request" => &[Role::Request],
        "on_failure" => &[Role::Failure, Role::Response],
        "on_reply" => &[Role::View, Role::Response],
        "on_branch" => &[Role::View, Role::Branch],
        "on_branch_failure" => &[Role::View, Role::Response],
        _ => &[],
    }
}

fn text_of(token: &TokenReference) -> String {
    token.token().to_string()
}

fn line_of(node: &impl Node) -> usize {
    node.start_position().map_or(0, |p| p.line())
}

/// A `name.field` or `name:method(...)` on a hook's parameter: the parameter, the name used,
/// whether it is a call, and its line.
fn member_use<'a>(
    prefix: &Prefix,
    mut suffixes: impl Iterator<Item = &'a Suffix>,
) -> Option<(String, String, bool, usize)> {
    let Prefix::Name(object) = prefix else {
        return None;
    };
    match suffixes.next()? {
        Suffix::Index(Index::Dot { name, .. }) => {
            Some((text_of(object), text_of(name), false, line_of(name)))
        }
        Suffix::Call(Call::MethodCall(call)) => Some((
            text_of(object),
            text_of(call.name()),
            true,
            line_of(call.name()),
        )),
        _ => None,
    }
}

/// Field and method names used on the hook's parameters, and where they are allowed.
struct Uses<'a> {
    objects: &'a [(String, Role)],
    names: &'a dyn Names,
    hook: &'a str,
    findings: &'a mut Vec<Finding>,
}

impl Uses<'_> {
    fn check(&mut self, found: Option<(String, String, bool, usize)>) {
        let Some((object, name, call, line)) = found else {
            return;
        };
        let Some(&(_, role)) = self.objects.iter().find(|(o, _)| *o == object) else {
            return;
        };
        let shown = object_name(role);
        let sep = if call { ":" } else { "." };
        if !self.names.message_has(&name) {
            let hint = did_you_mean(&name, MESSAGE_NAMES.iter().copied())
                .map(|s| format!(" (did you mean {object}{sep}{s}?)"))
                .unwrap_or_default();
            self.findings.push(Finding {
                line,
                message: format!("{object}{sep}{name}: {shown} has no such field or method{hint}"),
            });
            return;
        }
        // A response's own primitives (`res:nat_detect`, `res:drop`) are its role's; of the
        // request's, none decides on a response.
        let refused = match role {
            Role::Response => DECISIONS.contains(&name.as_str()) && name != "drop",
            _ => RESTRICTED
                .iter()
                .any(|(n, allowed)| *n == name && !allowed.contains(&role)),
        };
        if call && refused {
            {
                self.findings.push(Finding {
                    line,
                    message: format!(
                        "{object}:{name} is not available on {shown} in {}",
                        self.hook
                    ),
                });
            }
        }
    }
}

impl Visitor for Uses<'_> {
    fn visit_function_call(&mut self, call: &ast::FunctionCall) {
        self.check(member_use(call.prefix(), call.suffixes()));
    }

    fn visit_var_expression(&mut self, var: &ast::VarExpression) {
        self.check(member_use(var.prefix(), var.suffixes()));
    }
}

/// `sip.a.b` paths checked against the engine's namespaces.
struct SipNames<'a> {
    names: &'a dyn Names,
    findings: &'a mut Vec<Finding>,
}

impl SipNames<'_> {
    fn check<'s>(&mut self, prefix: &Prefix, suffixes: impl Iterator<Item = &'s Suffix>) {
        let Prefix::Name(root) = prefix else {
            return;
        };
        if text_of(root) != "sip" {
            return;
        }
        let mut path: Vec<String> = Vec::new();
        for suffix in suffixes {
            let Suffix::Index(Index::Dot { name, .. }) = suffix else {
                return;
            };
            let Some(keys) = self.names.sip_keys(&path) else {
                return;
            };
            let key = text_of(name);
            if !keys.contains(&key) {
                let hint = did_you_mean(&key, keys.iter().map(String::as_str))
                    .map(|s| format!(" (did you mean {s}?)"))
                    .unwrap_or_default();
                let mut shown = vec!["sip".to_owned()];
                shown.extend(path);
                self.findings.push(Finding {
                    line: line_of(name),
                    message: format!("{}.{key}: no such name{hint}", shown.join(".")),
                });
                return;
            }
            path.push(key);
        }
    }
}

impl Visitor for SipNames<'_> {
    fn visit_function_call(&mut self, call: &ast::FunctionCall) {
        self.check(call.prefix(), call.suffixes());
    }

    fn visit_var_expression(&mut self, var: &ast::VarExpression) {
        self.check(var.prefix(), var.suffixes());
    }
}

/// Paths through a hook's body that make a second decision without returning after the
/// first: `decided` is the decision (name, line) a path may have made and gone on from.
struct Paths<'a> {
    req: &'a str,
    findings: &'a mut Vec<Finding>,
}

type Decided = Option<(String, usize)>;

impl Paths<'_> {
    /// Walks `block` entered with `decided`; returns what falls out of its end, `None` inside
    /// `Some` meaning no path falls through (it returned or raised).
    fn block(&mut self, block: &Block, mut decided: Decided) -> Option<Decided> {
        for stmt in block.stmts() {
            decided = self.stmt(stmt, decided)?;
        }
        match block.last_stmt() {
            Some(LastStmt::Return(ret)) => {
                for expression in ret.returns() {
                    self.expression(expression, &decided);
                }
                None
            }
            Some(_) => Some(decided),
            None => Some(decided),
        }
    }

    fn stmt(&mut self, stmt: &Stmt, decided: Decided) -> Option<Decided> {
        let branch =
            |this: &mut Self, block: &Block, decided: &Decided| this.block(block, decided.clone());
        match stmt {
            Stmt::If(if_stmt) => {
                let mut outs = vec![branch(self, if_stmt.block(), &decided)];
                for else_if in if_stmt.else_if().into_iter().flatten() {
                    outs.push(branch(self, else_if.block(), &decided));
                }
                match if_stmt.else_block() {
                    Some(block) => outs.push(branch(self, block, &decided)),
                    None => outs.push(Some(decided.clone())),
                }
                let falling: Vec<Decided> = outs.into_iter().flatten().collect();
                if falling.is_empty() {
                    return None;
                }
                Some(falling.into_iter().flatten().next())
            }
            Stmt::Do(block) => self.block(block.block(), decided),
            Stmt::While(w) => Some(self.loop_body(w.block(), decided)),
            Stmt::Repeat(r) => Some(self.loop_body(r.block(), decided)),
            Stmt::NumericFor(f) => Some(self.loop_body(f.block(), decided)),
            Stmt::GenericFor(f) => Some(self.loop_body(f.block(), decided)),
            Stmt::FunctionCall(call) if is_error_call(call) => None,
            other => {
                let mut found = Decisions {
                    req: self.req,
                    found: Vec::new(),
                };
                other.visit(&mut found);
                let mut decided = decided;
                for (name, line) in found.found {
                    self.second(&decided, &name, line);
                    decided = Some((name, line));
                }
                Some(decided)
            }
        }
    }

    /// A loop body may run or not: what comes out is what went in or what it decided.
    fn loop_body(&mut self, block: &Block, decided: Decided) -> Decided {
        match self.block(block, decided.clone()) {
            Some(Some(made)) => Some(made),
            _ => decided,
        }
    }

    fn expression(&mut self, expression: &Expression, decided: &Decided) {
        let mut found = Decisions {
            req: self.req,
            found: Vec::new(),
        };
        expression.visit(&mut found);
        let mut decided = decided.clone();
        for (name, line) in found.found {
            self.second(&decided, &name, line);
            decided = Some((name, line));
        }
    }

    fn second(&mut self, decided: &Decided, name: &str, line: usize) {
        if let Some((first, first_line)) = decided {
            self.findings.push(Finding {
                line,
                message: format!(
                    "{}:{name} after {}:{first} (line {first_line}) on a path that did not return: one decision per call (write `return {}:{first}(...)`)",
                    self.req, self.req, self.req
                ),
            });
        }
    }
}

/// `error(...)`: the path ends there.
fn is_error_call(call: &ast::FunctionCall) -> bool {
    matches!(call.prefix(), Prefix::Name(name) if text_of(name) == "error")
}

/// Decision calls on `req` in a statement or expression, in source order.
struct Decisions<'a> {
    req: &'a str,
    found: Vec<(String, usize)>,
}

impl Visitor for Decisions<'_> {
    fn visit_function_call(&mut self, call: &ast::FunctionCall) {
        if let Some((object, name, true, line)) = member_use(call.prefix(), call.suffixes()) {
            if object == self.req && DECISIONS.contains(&name.as_str()) {
                self.found.push((name, line));
            }
        }
    }

    // Functions defined inside a hook run when called, not here.
    fn visit_function_body(&mut self, _body: &ast::FunctionBody) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Names for Fixed {
        fn message_has(&self, name: &str) -> bool {
            MESSAGE_NAMES.contains(&name)
        }
        fn sip_keys(&self, path: &[String]) -> Option<Vec<String>> {
            let keys: &[&str] = match path {
                [] => &["kv", "log", "re"],
                [ns] if ns == "kv" => &["get", "set", "incr"],
                _ => return None,
            };
            Some(keys.iter().map(|k| k.to_string()).collect())
        }
    }

    fn messages(text: &str) -> Vec<String> {
        lint(text, &Fixed)
            .into_iter()
            .map(|f| format!("{}: {}", f.line, f.message))
            .collect()
    }

    #[test]
    fn a_misspelt_hook() {
        let found = messages(
            "function on_request(req) return req:reply(404) end\nfunction on_faliure(req, res) end",
        );
        assert_eq!(
            found,
            ["2: function on_faliure is not a hook the engine calls (did you mean on_failure?)"]
        );
        assert!(messages("function helper(x) end\nlocal function on_x() end").is_empty());
    }

    #[test]
    fn a_primitive_that_does_not_exist() {
        let found = messages("function on_request(req)\n  return req:sl_send_reply(404, 'x')\nend");
        assert_eq!(
            found,
            ["2: req:sl_send_reply: req has no such field or method"]
        );
        let found = messages(
            "function on_request(msg)\n  if msg.ruri_usr then end return msg:reply(404)\nend",
        );
        assert_eq!(
            found,
            ["2: msg.ruri_usr: req has no such field or method (did you mean msg.ruri_user?)"]
        );
        let found = messages("function on_request(req)\n  sip.kv.incrr('x') sip.log('info', 'x') return req:reply(404)\nend");
        assert_eq!(
            found,
            ["2: sip.kv.incrr: no such name (did you mean incr?)"]
        );
    }

    #[test]
    fn a_decision_where_it_is_not_allowed() {
        let found = messages("function on_request(req) return req:t_relay() end\nfunction on_reply(req, res)\n  req:reply(500)\nend\nfunction on_failure(req, res)\n  return req:forward('sip:a@127.0.0.1')\nend");
        assert_eq!(
            found,
            [
                "3: req:reply is not available on req in on_reply",
                "6: req:forward is not available on req in on_failure"
            ]
        );
    }

    #[test]
    fn a_failure_route_may_answer_with_reply() {
        let found = messages("function on_request(req) return req:t_relay() end\nfunction on_failure(req, res)\n  req:append_header('X-Why', 'busy')\n  return req:reply(480, 'Gone', {['X-Why'] = 'busy'})\nend");
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn two_decisions_on_one_path() {
        let found = messages(
            "function on_request(req)
               if req.method == 'OPTIONS' then
                 req:reply(200)
               end
               return req:t_relay()
             end",
        );
        assert_eq!(
            found,
            ["5: req:t_relay after req:reply (line 3) on a path that did not return: one decision per call (write `return req:reply(...)`)"]
        );
        // Returned, raised, or on separate branches: fine.
        assert!(messages(
            "function on_request(req)
               if req.method == 'OPTIONS' then return req:reply(200) end
               if req.method == 'BYE' then req:reply(481) return end
               if req.method == 'X' then error('no') end
               if req.method == 'INVITE' then req:t_relay() else req:reply(405) end
             end"
        )
        .is_empty());
        let found = messages("function on_request(req)\n  req:reply(404) req:drop()\nend");
        assert_eq!(found.len(), 1, "{found:?}");
    }
}
