//! `sip.metrics`: counters, gauges and histograms a script defines, exported with the
//! engine's own families by the `[metrics] listen` endpoint and `moonroute ctl stats`
//! (Kamailio's `statistics` module / `update_stat`, `xhttp_prom`'s `prom_counter_inc`).
//!
//! - `sip.metrics.counter(name [, labels])` → handle with `:inc([n])`, `:value()`
//! - `sip.metrics.gauge(name [, labels])` → `:set(v)`, `:inc([n])`, `:dec([n])`, `:value()`
//! - `sip.metrics.histogram(name [, labels [, buckets]])` → `:observe(v)`, `:count()`
//! - each also takes one table: `sip.metrics.counter{name = ..., help = ..., labels = ...,
//!   buckets = ...}`.
//!
//! `labels` is a table such as `{dir = "out"}`: its keys (sorted) are the family's label
//! names, its values (strings or numbers) this handle's label values. Families live in the
//! server's [`crate::metrics::Registry`] (`Services::metrics`): every event loop and every
//! script version share them, so values survive reloads. Asking again for the same name with
//! the same kind and label names gives the same family; a different kind or label set, an
//! invalid name, or a name in the engine's reserved `moonroute_` prefix is an error at the
//! script's line. Looking a handle up takes a lock: scripts create handles at top level and
//! only update them in hooks.

use std::sync::Arc;

use mlua::{Lua, Table, UserData, UserDataMethods, Value};

use super::{env, runtime};
use crate::metrics::{Counter, Gauge, Histogram, Registry, DURATION_BUCKETS};

/// Names the engine keeps for its own families.
const RESERVED_PREFIX: &str = "moonroute_";

/// The `# HELP` text of a family whose script gave none.
const DEFAULT_HELP: &str = "Defined by the routing script.";

/// A handle of one label set of a script's counter.
struct ScriptCounter(Counter);
/// ... of a gauge.
struct ScriptGauge(Gauge);
/// ... of a histogram.
struct ScriptHistogram(Histogram);

impl UserData for ScriptCounter {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("inc", |_, counter, n: Option<Value>| {
            counter.0.add(counter_step(n)?);
            Ok(())
        });
        methods.add_method("value", |_, counter, ()| {
            Ok(i64::try_from(counter.0.get()).unwrap_or(i64::MAX))
        });
    }
}

impl UserData for ScriptGauge {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("set", |_, gauge, v: f64| {
            gauge.0.set(v);
            Ok(())
        });
        methods.add_method("inc", |_, gauge, n: Option<f64>| {
            gauge.0.add(n.unwrap_or(1.0));
            Ok(())
        });
        methods.add_method("dec", |_, gauge, n: Option<f64>| {
            gauge.0.add(-n.unwrap_or(1.0));
            Ok(())
        });
        methods.add_method("value", |_, gauge, ()| Ok(gauge.0.get()));
    }
}

impl UserData for ScriptHistogram {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("observe", |_, histogram, v: f64| {
            histogram.0.observe(v);
            Ok(())
        });
        methods.add_method("count", |_, histogram, ()| {
            Ok(i64::try_from(histogram.0.count()).unwrap_or(i64::MAX))
        });
    }
}

/// A counter's increment: a whole number, 1 by default; counters never go down.
fn counter_step(n: Option<Value>) -> mlua::Result<u64> {
    let step = match n {
        None | Some(Value::Nil) => return Ok(1),
        Some(Value::Integer(i)) => Some(i),
        Some(Value::Number(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    };
    step.and_then(|i| u64::try_from(i).ok()).ok_or_else(|| {
        runtime("counter:inc: the increment must be a whole number >= 0 (counters never go down; use a gauge)")
    })
}

/// What one `sip.metrics.*` call asks for.
struct Spec {
    name: String,
    help: String,
    /// Label names (sorted) and this handle's values, in the same order.
    labels: Vec<(String, String)>,
    buckets: Option<Vec<f64>>,
}

impl Spec {
    /// From `(name [, labels [, buckets]])` or `({name=, help=, labels=, buckets=})`.
    fn parse(primitive: &str, args: (Value, Option<Table>, Option<Table>)) -> mlua::Result<Spec> {
        let (first, labels, buckets) = args;
        let (name, help, labels, buckets) = match first {
            Value::String(name) => (name.to_str()?.to_owned(), None, labels, buckets),
            Value::Table(options) => (
                options
                    .get::<Option<String>>("name")?
                    .ok_or_else(|| runtime(format!("{primitive}: the table needs a name")))?,
                options.get::<Option<String>>("help")?,
                options.get::<Option<Table>>("labels")?,
                options.get::<Option<Table>>("buckets")?,
            ),
            other => {
                return Err(runtime(format!(
                    "{primitive}: expects a metric name or an options table, not {}",
                    other.type_name()
                )))
            }
        };
        if name.starts_with(RESERVED_PREFIX) {
            return Err(runtime(format!(
                "{primitive}: {name:?}: names starting with {RESERVED_PREFIX:?} are reserved for the engine's metrics"
            )));
        }
        Ok(Spec {
            name,
            help: help.unwrap_or_else(|| DEFAULT_HELP.to_owned()),
            labels: labels
                .map(|t| label_pairs(primitive, t))
                .transpose()?
                .unwrap_or_default(),
            buckets: buckets.map(|t| bucket_list(primitive, t)).transpose()?,
        })
    }

    fn names(&self) -> Vec<&str> {
        self.labels.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn values(&self) -> Vec<&str> {
        self.labels.iter().map(|(_, v)| v.as_str()).collect()
    }
}

/// `{dir = "out", code = 404}` → `[("code", "404"), ("dir", "out")]`.
fn label_pairs(primitive: &str, table: Table) -> mlua::Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for pair in table.pairs::<Value, Value>() {
        let (key, value) = pair?;
        let Value::String(key) = key else {
            return Err(runtime(format!(
                "{primitive}: label names are strings (labels = {{name = value}}), not {}",
                key.type_name()
            )));
        };
        let value = match value {
            Value::String(s) => s.to_str()?.to_owned(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => (n as i64).to_string(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(runtime(format!(
                    "{primitive}: label values are strings or numbers, not {}",
                    other.type_name()
                )))
            }
        };
        pairs.push((key.to_str()?.to_owned(), value));
    }
    pairs.sort();
    Ok(pairs)
}

fn bucket_list(primitive: &str, table: Table) -> mlua::Result<Vec<f64>> {
    table
        .sequence_values::<f64>()
        .collect::<mlua::Result<Vec<f64>>>()
        .map_err(|_| runtime(format!("{primitive}: buckets are a list of numbers")))
}

fn registry(lua: &Lua, primitive: &str) -> mlua::Result<Arc<Registry>> {
    Ok(env(lua, primitive)?.services.metrics.clone())
}

fn counter(lua: &Lua, args: (Value, Option<Table>, Option<Table>)) -> mlua::Result<ScriptCounter> {
    const PRIMITIVE: &str = "sip.metrics.counter";
    let spec = Spec::parse(PRIMITIVE, args)?;
    let family = registry(lua, PRIMITIVE)?
        .counter_family(&spec.name, &spec.help, &spec.names())
        .map_err(|e| runtime(format!("{PRIMITIVE}: {e}")))?;
    family
        .try_with(&spec.values())
        .map(ScriptCounter)
        .map_err(|e| runtime(format!("{PRIMITIVE}: {}: {e}", spec.name)))
}

fn gauge(lua: &Lua, args: (Value, Option<Table>, Option<Table>)) -> mlua::Result<ScriptGauge> {
    const PRIMITIVE: &str = "sip.metrics.gauge";
    let spec = Spec::parse(PRIMITIVE, args)?;
    let family = registry(lua, PRIMITIVE)?
        .gauge_family(&spec.name, &spec.help, &spec.names())
        .map_err(|e| runtime(format!("{PRIMITIVE}: {e}")))?;
    family
        .try_with(&spec.values())
        .map(ScriptGauge)
        .map_err(|e| runtime(format!("{PRIMITIVE}: {}: {e}", spec.name)))
}

fn histogram(
    lua: &Lua,
    args: (Value, Option<Table>, Option<Table>),
) -> mlua::Result<ScriptHistogram> {
    const PRIMITIVE: &str = "sip.metrics.histogram";
    let spec = Spec::parse(PRIMITIVE, args)?;
    let buckets = spec.buckets.as_deref().unwrap_or(DURATION_BUCKETS);
    let family = registry(lua, PRIMITIVE)?
        .histogram_family(&spec.name, &spec.help, &spec.names(), buckets)
        .map_err(|e| runtime(format!("{PRIMITIVE}: {e}")))?;
    family
        .try_with(&spec.values())
        .map(ScriptHistogram)
        .map_err(|e| runtime(format!("{PRIMITIVE}: {}: {e}", spec.name)))
}

/// Adds `sip.metrics` to the `sip` table.
pub(super) fn install(lua: &Lua, sip: &Table) -> mlua::Result<()> {
    let metrics = lua.create_table()?;
    metrics.set("counter", lua.create_function(counter)?)?;
    metrics.set("gauge", lua.create_function(gauge)?)?;
    metrics.set("histogram", lua.create_function(histogram)?)?;
    sip.set("metrics", metrics)
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::proxy::identity::LocalIdentity;
    use crate::script::engine::{Engine, Env, Limits, LogSink, ScriptSource};
    use crate::script::Services;

    fn load(services: &Arc<Services>, text: &str) -> Result<Engine, String> {
        let env = Env {
            identity: LocalIdentity::default(),
            services: services.clone(),
            log: LogSink::Capture(Rc::default()),
        };
        let source = ScriptSource {
            name: "unit.lua".into(),
            text: format!("{text}\nfunction on_request(req) end"),
            version: 1,
        };
        Engine::load(&source, Limits::default(), env).map_err(|e| e.0)
    }

    fn load_error(services: &Arc<Services>, text: &str) -> String {
        match load(services, text) {
            Ok(_) => panic!("loaded: {text}"),
            Err(error) => error,
        }
    }

    fn call(engine: &Engine, function: &str) -> Result<Value, String> {
        let f: mlua::Function = engine.lua().globals().get(function).unwrap();
        engine
            .call(&f, ())
            .map(|()| Value::Nil)
            .map_err(|e| e.0.clone())
    }

    fn sample(services: &Services, line_start: &str) -> Option<String> {
        services
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with(line_start))
            .map(str::to_owned)
    }

    #[test]
    fn counters_gauges_and_histograms_are_exported_with_their_labels() {
        let services = Arc::new(Services::default());
        let engine = load(
            &services,
            r#"
            local out = sip.metrics.counter("calls_total", {dir = "out", code = 200})
            local plain = sip.metrics.counter{name = "hits_total", help = "Hits seen."}
            local active = sip.metrics.gauge("active_calls")
            local setup = sip.metrics.histogram("setup_seconds", nil, {0.1, 1})
            function f()
                out:inc() out:inc(2) plain:inc()
                active:inc(5) active:dec() active:dec(0.5)
                setup:observe(0.05) setup:observe(3)
                assert(out:value() == 3 and active:value() == 3.5 and setup:count() == 2)
            end"#,
        )
        .unwrap();
        call(&engine, "f").unwrap();
        let text = services.metrics.render();
        assert!(
            text.contains(
                "# HELP calls_total Defined by the routing script.\n# TYPE calls_total counter\n"
            ),
            "{text}"
        );
        assert_eq!(
            sample(&services, "calls_total{").as_deref(),
            Some(r#"calls_total{code="200",dir="out"} 3"#)
        );
        assert!(text.contains("# HELP hits_total Hits seen.\n"), "{text}");
        assert_eq!(
            sample(&services, "hits_total ").as_deref(),
            Some("hits_total 1")
        );
        assert_eq!(
            sample(&services, "active_calls ").as_deref(),
            Some("active_calls 3.5")
        );
        assert!(text.contains("# TYPE setup_seconds histogram\n"), "{text}");
        assert!(
            text.contains("setup_seconds_bucket{le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("setup_seconds_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("setup_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("setup_seconds_count 2\n"), "{text}");
    }

    #[test]
    fn a_new_script_version_keeps_the_values() {
        let services = Arc::new(Services::default());
        let script = r#"local c = sip.metrics.counter("seen_total", {kind = "x"})
            function f() c:inc() end"#;
        let first = load(&services, script).unwrap();
        call(&first, "f").unwrap();
        let second = load(&services, script).unwrap();
        call(&second, "f").unwrap();
        assert_eq!(
            sample(&services, "seen_total{").as_deref(),
            Some(r#"seen_total{kind="x"} 2"#)
        );
    }

    #[test]
    fn bad_definitions_are_errors_at_the_scripts_line() {
        let services = Arc::new(Services::default());
        let cases: &[(&str, &str, &str)] = &[
            (
                "\nsip.metrics.counter('moonroute_calls_total')",
                "unit.lua:2:",
                "reserved for the engine",
            ),
            (
                "sip.metrics.gauge('bad-name')",
                "unit.lua:1:",
                "invalid metric name",
            ),
            (
                "sip.metrics.counter('x_total')\n\nsip.metrics.gauge('x_total')",
                "unit.lua:3:",
                "already exists as a counter",
            ),
            (
                "sip.metrics.counter('y_total', {a = 1})\nsip.metrics.counter('y_total', {b = 1})",
                "unit.lua:2:",
                "already exists with labels [a]",
            ),
            (
                "sip.metrics.counter('z_total', {a = {}})",
                "unit.lua:1:",
                "label values are strings or numbers",
            ),
            (
                "sip.metrics.histogram('h', nil, {1, 0.5})",
                "unit.lua:1:",
                "ascending",
            ),
        ];
        for (script, place, cause) in cases {
            let error = load_error(&services, script);
            assert!(
                error.starts_with(place) && error.contains(cause),
                "{script}: {error}"
            );
        }
        let engine = load(
            &services,
            "local c = sip.metrics.counter('n_total')\nfunction f()\n  c:inc(-1)\nend",
        )
        .unwrap();
        let error = call(&engine, "f").unwrap_err();
        assert!(
            error.starts_with("unit.lua:3:") && error.contains("never go down"),
            "{error}"
        );
    }
}
