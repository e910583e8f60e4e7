use super::*;

#[path = "../../../tests/common/exposition.rs"]
mod exposition;
use exposition::assert_valid_exposition;

#[test]
fn counters_gauges_and_histograms_render_in_the_text_format() {
    let registry = Registry::new();
    let requests = registry
        .counter_family("sip_requests_total", "Requests.", &["method"])
        .unwrap();
    requests.with(&["INVITE"]).inc();
    requests.with(&["INVITE"]).add(2);
    requests.with(&["BYE"]).inc();
    registry.gauge("live", "Live things.").set(7.0);
    let hist = registry
        .histogram_family("hook_seconds", "Hook time.", &["hook"], &[0.001, 0.01])
        .unwrap();
    hist.with(&["on_request"]).observe(0.0005);
    hist.with(&["on_request"]).observe(0.005);
    hist.with(&["on_request"]).observe(3.0);
    registry.gauge_fn("bindings", "Bindings.", || 42.0);

    let text = registry.render();
    assert_valid_exposition(&text);
    assert!(
        text.contains("sip_requests_total{method=\"INVITE\"} 3\n"),
        "{text}"
    );
    assert!(text.contains("sip_requests_total{method=\"BYE\"} 1\n"));
    assert!(text.contains("# TYPE live gauge\nlive 7\n"));
    assert!(text.contains("hook_seconds_bucket{hook=\"on_request\",le=\"0.001\"} 1\n"));
    assert!(text.contains("hook_seconds_bucket{hook=\"on_request\",le=\"0.01\"} 2\n"));
    assert!(text.contains("hook_seconds_bucket{hook=\"on_request\",le=\"+Inf\"} 3\n"));
    assert!(text.contains("hook_seconds_count{hook=\"on_request\"} 3\n"));
    assert!(
        text.contains("hook_seconds_sum{hook=\"on_request\"} 3.0055\n"),
        "{text}"
    );
    assert!(text.contains("bindings 42\n"));
}

#[test]
fn label_values_and_help_are_escaped() {
    let registry = Registry::new();
    let family = registry
        .counter_family("odd_total", "Line one\nback\\slash.", &["v"])
        .unwrap();
    family.with(&["a\"b\\c\nd"]).inc();
    let text = registry.render();
    assert!(
        text.contains("# HELP odd_total Line one\\nback\\\\slash.\n"),
        "{text}"
    );
    assert!(
        text.contains("odd_total{v=\"a\\\"b\\\\c\\nd\"} 1\n"),
        "{text}"
    );
    assert_valid_exposition(&text);
}

#[test]
fn asking_again_returns_the_same_family_and_conflicts_are_errors() {
    let registry = Registry::new();
    let first = registry
        .counter_family("calls_total", "Calls.", &["dir"])
        .unwrap();
    first.with(&["out"]).inc();
    let again = registry
        .counter_family("calls_total", "Calls.", &["dir"])
        .unwrap();
    assert_eq!(again.with(&["out"]).get(), 1);
    let wrong_labels = registry.counter_family("calls_total", "Calls.", &["x"]);
    assert!(wrong_labels
        .unwrap_err()
        .to_string()
        .contains("already exists with labels [dir]"));
    let wrong_kind = registry.gauge_family("calls_total", "Calls.", &["dir"]);
    assert!(wrong_kind
        .unwrap_err()
        .to_string()
        .contains("already exists as a counter"));
    assert_eq!(
        first.try_with(&[]).unwrap_err().to_string(),
        "expects labels [dir], got 0 value(s)"
    );
}

#[test]
fn names_are_checked() {
    let registry = Registry::new();
    for bad in ["", "1abc", "a-b", "a b", "é"] {
        assert!(registry.counter_family(bad, "x", &[]).is_err(), "{bad:?}");
    }
    for bad in ["__x", "1a", "a:b", "a-b"] {
        assert!(
            registry.counter_family("ok", "x", &[bad]).is_err(),
            "{bad:?}"
        );
    }
    assert!(registry.counter_family("dup", "x", &["a", "a"]).is_err());
    assert!(registry
        .histogram_family("h", "x", &["le"], &[1.0])
        .is_err());
    assert!(registry
        .histogram_family("h", "x", &[], &[2.0, 1.0])
        .is_err());
    assert!(registry
        .counter_family("ns:ok_total", "x", &["_a1"])
        .is_ok());
}

#[test]
fn label_sets_are_bounded() {
    let registry = Registry::new();
    let family = registry.counter_family("many_total", "x", &["n"]).unwrap();
    for n in 0..MAX_SERIES_PER_FAMILY + 5 {
        family.with(&[&n.to_string()]).inc();
    }
    let text = registry.render();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("many_total{"))
            .count(),
        MAX_SERIES_PER_FAMILY
    );
}

#[test]
fn values_are_formatted_for_prometheus() {
    assert_eq!(format_value(3.0), "3");
    assert_eq!(format_value(-2.0), "-2");
    assert_eq!(format_value(0.25), "0.25");
    assert_eq!(format_value(f64::INFINITY), "+Inf");
    assert_eq!(format_value(f64::NAN), "NaN");
    let gauge = Gauge::default();
    gauge.add(1.5);
    gauge.add(-0.5);
    assert_eq!(gauge.get(), 1.0);
}

/// Scripts get these texts in their Lua errors (`sip.metrics.*`): they stay what they were as
/// strings.
#[test]
fn registration_errors_keep_their_texts() {
    let registry = Registry::new();
    let text = |error: RegisterError| error.to_string();
    assert_eq!(
        text(registry.counter_family("9x", "", &[]).unwrap_err()),
        "invalid metric name \"9x\": use letters, digits, '_' and ':', not starting with a digit"
    );
    assert_eq!(
        text(registry.histogram_family("h", "", &["le"], &[1.0]).unwrap_err()),
        "metric h: invalid label name \"le\": use letters, digits and '_', not starting with a digit or \"__\""
    );
    assert_eq!(
        text(registry.gauge_family("g", "", &["a", "a"]).unwrap_err()),
        "metric g: label \"a\" is listed twice"
    );
    assert_eq!(
        text(
            registry
                .histogram_family("h", "", &[], &[2.0, 1.0])
                .unwrap_err()
        ),
        "metric h: histogram bounds must be ascending numbers"
    );
    registry.counter_family("c_total", "", &["a", "b"]).unwrap();
    assert_eq!(
        registry.counter_family("c_total", "", &["a"]).unwrap_err(),
        RegisterError::OtherLabels {
            name: "c_total".to_owned(),
            label_names: vec!["a".to_owned(), "b".to_owned()],
        }
    );
    assert_eq!(
        text(registry.counter_family("c_total", "", &["a"]).unwrap_err()),
        "metric c_total already exists with labels [a, b]"
    );
    assert_eq!(
        text(registry.gauge_family("c_total", "", &[]).unwrap_err()),
        "metric c_total already exists as a counter"
    );
}
