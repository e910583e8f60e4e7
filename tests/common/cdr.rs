//! Reading the CDR file (`<data_dir>/cdr.jsonl`, `moonroute-proto/src/dialog/cdr.rs`) in tests: its lines,
//! and a field of a line, without a JSON parser.

use std::path::Path;

/// The CDR lines written so far in the data directory `data_dir`.
pub fn lines(data_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(data_dir.join("cdr.jsonl"))
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The raw JSON value of `name` in a CDR line (`"x"` with its quotes, a number, `null`).
pub fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\":");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    let rest = &line[start..];
    let end = match rest.strip_prefix('"') {
        Some(quoted) => quoted.find('"').map_or(rest.len(), |i| i + 2),
        None => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    &rest[..end]
}

/// The number `name` of a CDR line.
pub fn number(line: &str, name: &str) -> f64 {
    field(line, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number in {line}"))
}
