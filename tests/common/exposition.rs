//! The Prometheus text exposition format (0.0.4), checked line by line: shared by the
//! metrics unit tests (`src/metrics/tests.rs`, via `#[path]`) and `tests/metrics.rs`.

/// Asserts `text` is valid exposition: every family has exactly one non-empty `# HELP` and one
/// `# TYPE` (after its HELP), every sample belongs to the family announced above it
/// (`_bucket`/`_sum`/`_count` for histograms), labels are closed, values parse, and the body
/// ends with a line feed.
#[allow(dead_code)] // not every test binary scrapes metrics
pub fn assert_valid_exposition(text: &str) {
    let mut helps = std::collections::HashSet::new();
    let mut types = std::collections::HashSet::new();
    let mut current: Option<(String, String)> = None;
    assert!(text.ends_with('\n'), "the body ends with a line feed");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.is_empty(), "empty HELP for {name}");
            assert!(helps.insert(name.to_owned()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(helps.contains(name), "TYPE before HELP for {name}");
            assert!(types.insert(name.to_owned()), "TYPE twice for {name}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type {kind} of {name}"
            );
            current = Some((name.to_owned(), kind.to_owned()));
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (family, kind) = current.as_ref().expect("sample before any TYPE");
            let name_end = line.find(['{', ' ']).expect("a sample name");
            let name = &line[..name_end];
            let allowed = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}")),
                _ => name == family,
            };
            assert!(allowed, "sample {name} under family {family}");
            let (series, value) = line.rsplit_once(' ').expect("a value");
            if series.contains('{') {
                assert!(series.ends_with('}'), "labels closed in {line}");
            }
            let parsed = matches!(value, "NaN" | "+Inf" | "-Inf") || value.parse::<f64>().is_ok();
            assert!(parsed, "value of {line}");
        }
    }
    assert_eq!(helps, types, "every HELP has its TYPE");
}
