//! Metrics: counters, gauges and histograms kept in atomics, and their rendering in the
//! Prometheus text exposition format (version 0.0.4), served by the `[metrics] listen`
//! endpoint and printed by `moonroute ctl stats`.
//!
//! Owns the [`Registry`] (one per server: tests run several servers in one process), the
//! metric handles ([`Counter`], [`Gauge`], [`Histogram`]), labelled families of them
//! ([`Family`]), and [`Exposition`], the writer that guarantees valid output: every family
//! gets its `# HELP` and `# TYPE` lines once, names and label names are checked, label
//! values and help text are escaped.
//!
//! Updating a handle is one relaxed atomic operation and never takes a lock: the engine
//! resolves its handles (e.g. one counter per method) once at start. Looking a labelled
//! child up ([`Family::with`]) takes a read lock; scripts are told to do it at load time.
//! Values the engine already keeps (bindings, open connections) are read at scrape time by
//! a callback ([`Registry::gauge_fn`]) instead of being mirrored on the hot path.
//!
//! Memory is bounded: a family holds at most [`MAX_SERIES_PER_FAMILY`] label sets; further
//! ones get a detached handle that counts but is never exported (with one warning).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Label sets one family may hold; beyond it new label sets are not exported.
pub const MAX_SERIES_PER_FAMILY: usize = 10_000;

/// Histogram buckets for durations in seconds, from 10 µs to 1 s (a Lua hook takes a few
/// µs; a runaway one is stopped well before a second).
pub const DURATION_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

/// The metric types of the exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A monotonic count. Clones share the value.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (an `f64`, stored as its bits). Clones share the value.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + delta).to_bits())
            });
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets, with their count and sum. Clones share the value.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds, ascending; `+Inf` is implicit (it is `count`).
    bounds: Arc<[f64]>,
    /// Per bucket (not cumulative): rendering accumulates.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: Arc<[f64]>) -> Histogram {
        let buckets = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Histogram(Arc::new(HistogramCells {
            bounds,
            buckets,
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }))
    }

    pub fn observe(&self, value: f64) {
        let cells = &self.0;
        if let Some(index) = cells.bounds.iter().position(|bound| value <= *bound) {
            cells.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        cells.count.fetch_add(1, Ordering::Relaxed);
        let _ = cells
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    pub fn observe_duration(&self, elapsed: std::time::Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let cells = &self.0;
        let mut cumulative = 0;
        let bucket_name = format!("{name}_bucket");
        for (bound, bucket) in cells.bounds.iter().zip(cells.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = format_value(*bound);
            out.sample_with(&bucket_name, labels, ("le", &le), cumulative as f64);
        }
        let count = cells.count.load(Ordering::Relaxed);
        out.sample_with(&bucket_name, labels, ("le", "+Inf"), count as f64);
        let sum = f64::from_bits(cells.sum_bits.load(Ordering::Relaxed));
        out.sample(&format!("{name}_sum"), labels, sum);
        out.sample(&format!("{name}_count"), labels, count as f64);
    }
}

/// Something a family can hold: the three handle types.
pub trait Metric: Clone + Send + Sync + 'static {
    const KIND: Kind;
    /// A fresh handle (histograms take the family's bucket bounds).
    fn create(bounds: &Arc<[f64]>) -> Self;
    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]);
}

impl Metric for Counter {
    const KIND: Kind = Kind::Counter;
    fn create(_: &Arc<[f64]>) -> Self {
        Counter::default()
    }
    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        out.sample(name, labels, self.get() as f64);
    }
}

impl Metric for Gauge {
    const KIND: Kind = Kind::Gauge;
    fn create(_: &Arc<[f64]>) -> Self {
        Gauge::default()
    }
    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        out.sample(name, labels, self.get());
    }
}

impl Metric for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn create(bounds: &Arc<[f64]>) -> Self {
        Histogram::new(Arc::clone(bounds))
    }
    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        Histogram::write(self, out, name, labels);
    }
}

/// One metric name with a fixed list of label names, and a child handle per label-value
/// set. A family without label names has one child, `with(&[])`.
pub struct Family<M: Metric> {
    name: String,
    help: String,
    label_names: Vec<String>,
    bounds: Arc<[f64]>,
    children: RwLock<BTreeMap<Vec<String>, M>>,
    overflow_warned: AtomicBool,
}

impl<M: Metric> std::fmt::Debug for Family<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .field("label_names", &self.label_names)
            .finish()
    }
}

impl<M: Metric> Family<M> {
    fn new(name: &str, help: &str, label_names: &[&str], bounds: &[f64]) -> Family<M> {
        Family {
            name: name.to_owned(),
            help: help.to_owned(),
            label_names: label_names.iter().map(|l| (*l).to_owned()).collect(),
            bounds: bounds.into(),
            children: RwLock::new(BTreeMap::new()),
            overflow_warned: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// The child for these label values, in the order of the label names. Resolve handles
    /// once and keep them: this takes a lock.
    ///
    /// # Panics
    /// When the number of values differs from the number of label names (a programming
    /// error; scripts go through [`Family::try_with`]).
    pub fn with(&self, values: &[&str]) -> M {
        self.try_with(values)
            .unwrap_or_else(|error| panic!("metric {}: {error}", self.name))
    }

    /// [`Family::with`], with a wrong number of values as an error.
    pub fn try_with(&self, values: &[&str]) -> Result<M, LabelCountError> {
        if values.len() != self.label_names.len() {
            return Err(LabelCountError {
                label_names: self.label_names.clone(),
                got: values.len(),
            });
        }
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let children = self.children.read().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = children.get(&key) {
            return Ok(child.clone());
        }
        drop(children);
        let mut children = self.children.write().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = children.get(&key) {
            return Ok(child.clone());
        }
        let child = M::create(&self.bounds);
        if children.len() >= MAX_SERIES_PER_FAMILY {
            if !self.overflow_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(target: "moonroute::metrics",
                    metric = %self.name,
                    limit = MAX_SERIES_PER_FAMILY,
                    "metric has too many label sets: new ones are counted but not exported"
                );
            }
            return Ok(child);
        }
        children.insert(key, child.clone());
        Ok(child)
    }

    fn write(&self, out: &mut Exposition) {
        out.family(&self.name, &self.help, M::KIND);
        let children = self.children.read().unwrap_or_else(|e| e.into_inner());
        for (values, child) in children.iter() {
            let labels: Vec<(&str, &str)> = self
                .label_names
                .iter()
                .map(String::as_str)
                .zip(values.iter().map(String::as_str))
                .collect();
            child.write(out, &self.name, &labels);
        }
    }
}

/// A family whose samples are produced at scrape time.
pub type CollectFn = Box<dyn Fn(&mut Exposition) + Send + Sync>;

enum Entry {
    Counters(Arc<Family<Counter>>),
    Gauges(Arc<Family<Gauge>>),
    Histograms(Arc<Family<Histogram>>),
    /// Name, help, kind, and the callback writing its samples.
    Collected(String, String, Kind, CollectFn),
}

impl Entry {
    fn kind(&self) -> Kind {
        match self {
            Entry::Counters(_) => Kind::Counter,
            Entry::Gauges(_) => Kind::Gauge,
            Entry::Histograms(_) => Kind::Histogram,
            Entry::Collected(_, _, kind, _) => *kind,
        }
    }

    fn write(&self, out: &mut Exposition) {
        match self {
            Entry::Counters(family) => family.write(out),
            Entry::Gauges(family) => family.write(out),
            Entry::Histograms(family) => family.write(out),
            Entry::Collected(name, help, kind, collect) => {
                out.family(name, help, *kind);
                collect(out);
            }
        }
    }
}

/// Why a family could not be registered; each names the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// Not `[a-zA-Z_:][a-zA-Z0-9_:]*` ([`valid_metric_name`]).
    InvalidName {
        name: String,
    },
    /// Not a label name ([`valid_label_name`]), or `le` on a histogram (its bucket label).
    InvalidLabel {
        name: String,
        label: String,
    },
    LabelTwice {
        name: String,
        label: String,
    },
    /// Histogram bucket bounds not ascending, or NaN.
    BadBounds {
        name: String,
    },
    /// The name is taken by a family of the same kind with other label names.
    OtherLabels {
        name: String,
        label_names: Vec<String>,
    },
    /// The name is taken by a family of another kind.
    OtherKind {
        name: String,
        kind: Kind,
    },
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterError::InvalidName { name } => write!(
                f,
                "invalid metric name {name:?}: use letters, digits, '_' and ':', not starting with a digit"
            ),
            RegisterError::InvalidLabel { name, label } => write!(
                f,
                "metric {name}: invalid label name {label:?}: use letters, digits and '_', not starting with a digit or \"__\""
            ),
            RegisterError::LabelTwice { name, label } => {
                write!(f, "metric {name}: label {label:?} is listed twice")
            }
            RegisterError::BadBounds { name } => {
                write!(f, "metric {name}: histogram bounds must be ascending numbers")
            }
            RegisterError::OtherLabels { name, label_names } => write!(
                f,
                "metric {name} already exists with labels [{}]",
                label_names.join(", ")
            ),
            RegisterError::OtherKind { name, kind } => {
                write!(f, "metric {name} already exists as a {}", kind.as_str())
            }
        }
    }
}

impl std::error::Error for RegisterError {}

/// A family's child asked for with the wrong number of label values ([`Family::try_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelCountError {
    /// The family's label names.
    pub label_names: Vec<String>,
    /// How many values were given.
    pub got: usize,
}

impl std::fmt::Display for LabelCountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expects labels [{}], got {} value(s)",
            self.label_names.join(", "),
            self.got
        )
    }
}

impl std::error::Error for LabelCountError {}

/// Every metric family of one server, by name.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Registry")
            .field("families", &entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// The counter family `name` with these label names, created on first use. Asking again
    /// with the same type and label names returns the same family (scripts are reloaded);
    /// anything else is an error.
    pub fn counter_family(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> Result<Arc<Family<Counter>>, RegisterError> {
        self.family(
            name,
            help,
            label_names,
            &[],
            Entry::Counters,
            |entry| match entry {
                Entry::Counters(family) => Some(Arc::clone(family)),
                _ => None,
            },
        )
    }

    /// Like [`Registry::counter_family`], for gauges.
    pub fn gauge_family(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> Result<Arc<Family<Gauge>>, RegisterError> {
        self.family(
            name,
            help,
            label_names,
            &[],
            Entry::Gauges,
            |entry| match entry {
                Entry::Gauges(family) => Some(Arc::clone(family)),
                _ => None,
            },
        )
    }

    /// Like [`Registry::counter_family`], for histograms with these bucket upper bounds
    /// (ascending; `+Inf` is added).
    pub fn histogram_family(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
        bounds: &[f64],
    ) -> Result<Arc<Family<Histogram>>, RegisterError> {
        if !bounds.windows(2).all(|pair| pair[0] < pair[1]) || bounds.iter().any(|b| b.is_nan()) {
            return Err(RegisterError::BadBounds {
                name: name.to_owned(),
            });
        }
        self.family(
            name,
            help,
            label_names,
            bounds,
            Entry::Histograms,
            |entry| match entry {
                Entry::Histograms(family) => Some(Arc::clone(family)),
                _ => None,
            },
        )
    }

    /// An unlabelled counter (engine use: the name is known to be valid and unique).
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.counter_family(name, help, &[])
            .unwrap_or_else(|error| panic!("{error}"))
            .with(&[])
    }

    /// An unlabelled gauge (engine use).
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.gauge_family(name, help, &[])
            .unwrap_or_else(|error| panic!("{error}"))
            .with(&[])
    }

    /// A family whose samples `collect` writes at each scrape (with [`Exposition::sample`],
    /// using `name` or, for a histogram, its `_bucket`/`_sum`/`_count` names). Replaces an
    /// earlier callback of the same name (a server restarted in the same process).
    pub fn collect(&self, name: &str, help: &str, kind: Kind, collect: CollectFn) {
        assert!(valid_metric_name(name), "invalid metric name {name:?}");
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(
            name.to_owned(),
            Entry::Collected(name.to_owned(), help.to_owned(), kind, collect),
        );
    }

    /// An unlabelled gauge read at scrape time from `read`.
    pub fn gauge_fn(&self, name: &str, help: &str, read: impl Fn() -> f64 + Send + Sync + 'static) {
        let owned = name.to_owned();
        self.collect(
            name,
            help,
            Kind::Gauge,
            Box::new(move |out| out.sample(&owned, &[], read())),
        );
    }

    /// Whether a family of this name exists, and its kind.
    pub fn kind_of(&self, name: &str) -> Option<Kind> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(name).map(Entry::kind)
    }

    /// Every family in the text exposition format 0.0.4, sorted by name.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for entry in entries.values() {
            entry.write(&mut out);
        }
        out.finish()
    }

    fn family<M: Metric>(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
        bounds: &[f64],
        wrap: fn(Arc<Family<M>>) -> Entry,
        unwrap: fn(&Entry) -> Option<Arc<Family<M>>>,
    ) -> Result<Arc<Family<M>>, RegisterError> {
        check_names(name, label_names, M::KIND)?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(name) {
            return match unwrap(entry) {
                Some(family) if family.label_names == label_names => Ok(family),
                Some(family) => Err(RegisterError::OtherLabels {
                    name: name.to_owned(),
                    label_names: family.label_names.clone(),
                }),
                None => Err(RegisterError::OtherKind {
                    name: name.to_owned(),
                    kind: entry.kind(),
                }),
            };
        }
        let family = Arc::new(Family::new(name, help, label_names, bounds));
        entries.insert(name.to_owned(), wrap(Arc::clone(&family)));
        Ok(family)
    }
}

fn check_names(name: &str, label_names: &[&str], kind: Kind) -> Result<(), RegisterError> {
    if !valid_metric_name(name) {
        return Err(RegisterError::InvalidName {
            name: name.to_owned(),
        });
    }
    for (index, label) in label_names.iter().enumerate() {
        if !valid_label_name(label) || (kind == Kind::Histogram && *label == "le") {
            return Err(RegisterError::InvalidLabel {
                name: name.to_owned(),
                label: (*label).to_owned(),
            });
        }
        if label_names[..index].contains(label) {
            return Err(RegisterError::LabelTwice {
                name: name.to_owned(),
                label: (*label).to_owned(),
            });
        }
    }
    Ok(())
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the exposition format's metric names.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Writes the text exposition format; see [`Registry::render`].
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.value(value);
    }

    fn sample_with(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        extra: (&str, &str),
        value: f64,
    ) {
        self.out.push_str(name);
        self.labels(labels, Some(extra));
        self.value(value);
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        for (index, (name, value)) in labels.iter().copied().chain(extra).enumerate() {
            if index > 0 {
                self.out.push(',');
            }
            self.out.push_str(name);
            self.out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn value(&mut self, value: f64) {
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// Status codes counted one by one (RFC 3261 §7.2, §21: 100 to 699).
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 699;

/// One counter per status code 100..=699, rendered at scrape time for the codes seen only
/// (600 mostly-zero series would drown the useful ones). Clones share the counts.
#[derive(Clone, Debug)]
pub struct StatusCounters(Arc<[Counter]>);

impl Default for StatusCounters {
    fn default() -> Self {
        StatusCounters(
            (FIRST_CODE..=LAST_CODE)
                .map(|_| Counter::default())
                .collect(),
        )
    }
}

impl StatusCounters {
    /// Counts one response with this status code; codes outside 100..=699 are not counted
    /// (the parser refuses them).
    pub fn inc(&self, code: u16) {
        if let Some(counter) = code
            .checked_sub(FIRST_CODE)
            .and_then(|index| self.0.get(usize::from(index)))
        {
            counter.inc();
        }
    }

    pub fn get(&self, code: u16) -> u64 {
        code.checked_sub(FIRST_CODE)
            .and_then(|index| self.0.get(usize::from(index)))
            .map_or(0, Counter::get)
    }

    /// The samples of the codes counted at least once, ascending, as `name{code="NNN"}`.
    pub fn write(&self, out: &mut Exposition, name: &str) {
        for (code, counter) in (FIRST_CODE..=LAST_CODE).zip(self.0.iter()) {
            let value = counter.get();
            if value > 0 {
                out.sample(name, &[("code", &code.to_string())], value as f64);
            }
        }
    }

    /// Registers the family `name` in `registry`, rendered by [`StatusCounters::write`].
    pub fn register(registry: &Registry, name: &str, help: &str) -> StatusCounters {
        let counters = StatusCounters::default();
        let rendered = counters.clone();
        let owned = name.to_owned();
        registry.collect(
            name,
            help,
            Kind::Counter,
            Box::new(move |out| rendered.write(out, &owned)),
        );
        counters
    }
}

/// A counter family with one label, registered at start; a clash of names is a bug of the
/// server, not of its input, so it panics.
pub fn counter_family(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> Arc<Family<Counter>> {
    registry
        .counter_family(name, help, &[label])
        .unwrap_or_else(|error| panic!("{error}"))
}

#[cfg(test)]
mod tests;
