//! `moonroute ctl stats [PREFIX]`: the server's metric samples (what the `[metrics]`
//! endpoint serves, without the `# HELP`/`# TYPE` lines), optionally only the families whose
//! name starts with PREFIX (Kamailio's `kamcmd stats.get_statistics`).

use super::Reply;
use crate::metrics::Registry;

/// Runs `stats` with the arguments after it.
pub fn command(args: &[String], registry: &Registry) -> Reply {
    match args {
        [] => Reply::ok(samples(&registry.render(), "")),
        [prefix] => filtered(&registry.render(), prefix),
        _ => Reply::error("stats takes at most one argument, a metric name prefix, e.g. `stats moonroute_transactions`"),
    }
}

/// The samples of the families whose name starts with `prefix`; an error naming the
/// families when none does.
fn filtered(exposition: &str, prefix: &str) -> Reply {
    let families: Vec<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    if !families.iter().any(|name| name.starts_with(prefix)) {
        return Reply::error(format!(
            "no metric name starts with {prefix:?}; the metrics are: {}",
            families.join(", ")
        ));
    }
    Reply::ok(samples(exposition, prefix))
}

/// The sample lines (not the comments) whose metric name starts with `prefix`.
fn samples(exposition: &str, prefix: &str) -> String {
    let mut out = String::new();
    for line in exposition
        .lines()
        .filter(|line| !line.starts_with('#') && line.starts_with(prefix))
    {
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> std::sync::Arc<Registry> {
        let registry = Registry::new();
        registry.counter("moonroute_a_total", "A.").add(3);
        registry.gauge("moonroute_b", "B.").set(2.0);
        registry
    }

    #[test]
    fn all_samples_without_comments() {
        let reply = command(&[], &registry());
        assert!(reply.ok);
        assert_eq!(reply.text, "moonroute_a_total 3\nmoonroute_b 2\n");
    }

    #[test]
    fn a_prefix_keeps_its_families() {
        let reply = command(&["moonroute_b".to_owned()], &registry());
        assert!(reply.ok);
        assert_eq!(reply.text, "moonroute_b 2\n");
    }

    #[test]
    fn an_unknown_prefix_is_an_error_listing_the_metrics() {
        let reply = command(&["nope".to_owned()], &registry());
        assert!(!reply.ok);
        assert_eq!(
            reply.text,
            "no metric name starts with \"nope\"; the metrics are: moonroute_a_total, moonroute_b"
        );
        assert!(!command(&["a".to_owned(), "b".to_owned()], &registry()).ok);
    }
}
