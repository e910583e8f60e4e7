//! The health of one destination: its state, and how probe answers, probe timeouts, failed
//! calls and the operator move it. A sans-IO state machine: every event carries its `now`.
//!
//! States (Kamailio's flags in brackets):
//! - `probing` [`T`]: never probed (or put back by the operator): not confirmed. A set's
//!   `probing` destinations are used only after its `active` ones, as a last resort, so a
//!   restart neither sends every call to a gateway that died meanwhile nor refuses calls until
//!   the first answers arrive. The first probe decides: one alive answer makes it `active`,
//!   one failure `inactive`.
//! - `active` [`A`]: answered `up_after` probes in a row (or probing is off: with nothing to
//!   check, the configuration is trusted).
//! - `inactive` [`I`+`P`]: failed `down_after` probes in a row, or a call failed the way
//!   `mark_on` says; never selected, still probed, `active` again after `up_after` alive
//!   answers in a row.
//! - `disabled` [`D`]: the operator took it out (`ctl ds set URI disabled`): never selected,
//!   not probed, until the operator sets another state.

use std::fmt;
use std::time::{Duration, Instant};

/// Where a destination stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Active,
    Inactive,
    Probing,
    Disabled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Inactive => "inactive",
            State::Probing => "probing",
            State::Disabled => "disabled",
        }
    }

    /// The state named `name` (case-insensitive), or Kamailio's letter (`a`, `i`, `t`, `d`).
    pub fn parse(name: &str) -> Result<State, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "active" | "a" => Ok(State::Active),
            "inactive" | "i" => Ok(State::Inactive),
            "probing" | "t" | "p" => Ok(State::Probing),
            "disabled" | "d" => Ok(State::Disabled),
            other => Err(format!(
                "unknown state {other:?}: active, inactive, probing or disabled"
            )),
        }
    }

    /// Selection tier: `Some(0)` first, `Some(1)` as a last resort, `None` never.
    pub fn tier(self) -> Option<u8> {
        match self {
            State::Active => Some(0),
            State::Probing => Some(1),
            State::Inactive | State::Disabled => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a probe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A final response with this status code.
    Reply(u16),
    /// No final response within the probe timeout.
    Timeout,
    /// The request could not be sent (no route, connection refused, ICMP).
    Unreachable,
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Reply(code) => write!(f, "{code}"),
            ProbeOutcome::Timeout => f.write_str("timeout"),
            ProbeOutcome::Unreachable => f.write_str("unreachable"),
        }
    }
}

/// The rules a destination's health follows (from `[dispatcher]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Probe period; `None`: probing is off.
    pub interval: Option<Duration>,
    /// A probe without a final answer after this long failed.
    pub timeout: Duration,
    /// Failed probes in a row that make an `active` destination `inactive`.
    pub down_after: u32,
    /// Alive answers in a row that make an `inactive` destination `active`.
    pub up_after: u32,
    /// Status codes of a probe answer that prove the destination alive.
    pub alive: CodeSet,
    /// Failures of a call that mark its destination `inactive` at once.
    pub mark_on: CodeSet,
    /// The probe request's method (`OPTIONS` unless configured).
    pub method: String,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            interval: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(4),
            down_after: 1,
            up_after: 2,
            alive: CodeSet::parse(&DEFAULT_ALIVE.map(str::to_owned)).unwrap_or_default(),
            mark_on: CodeSet::parse(&DEFAULT_MARK_ON.map(str::to_owned)).unwrap_or_default(),
            method: "OPTIONS".to_owned(),
        }
    }
}

/// Probe answers that prove a destination alive unless configured: any 2xx, and the answers
/// of a SIP stack that processes requests but does not like OPTIONS or its From (401, 403,
/// 404, 405, 407, 501). 408, 480, 5xx other than 501 and 6xx do not.
pub const DEFAULT_ALIVE: [&str; 7] = ["2xx", "401", "403", "404", "405", "407", "501"];

/// Call failures that mark a destination `inactive` unless configured: a timeout (the 408 the
/// transaction layer makes up when nothing answered) and 503 (RFC 3261 §21.5.4: overloaded or
/// in maintenance).
pub const DEFAULT_MARK_ON: [&str; 2] = ["timeout", "503"];

/// A set of status codes written as `"200"`, `"2xx"` or `"timeout"` (a 408, made up or not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CodeSet {
    codes: Vec<u16>,
    classes: Vec<u16>,
}

impl CodeSet {
    pub fn parse(items: &[String]) -> Result<CodeSet, String> {
        let mut set = CodeSet::default();
        for item in items {
            let item = item.trim().to_ascii_lowercase();
            if item == "timeout" {
                set.codes.push(408);
                continue;
            }
            let bytes = item.as_bytes();
            match bytes {
                [class @ b'1'..=b'6', b'x', b'x'] => set.classes.push(u16::from(class - b'0')),
                _ => match item.parse::<u16>() {
                    Ok(code) if (100..=699).contains(&code) => set.codes.push(code),
                    _ => {
                        return Err(format!(
                            "{item:?} is not a status code (100-699), a class such as \"2xx\", or \"timeout\""
                        ))
                    }
                },
            }
        }
        Ok(set)
    }

    pub fn contains(&self, code: u16) -> bool {
        self.codes.contains(&code) || self.classes.contains(&(code / 100))
    }
}

/// The last probe's result, for `ctl ds list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastProbe {
    pub at: Instant,
    pub outcome: ProbeOutcome,
}

/// One destination's health.
#[derive(Clone, Debug)]
pub struct Health {
    state: State,
    /// Alive answers / failures in a row (one of them is 0).
    alive_run: u32,
    failed_run: u32,
    /// Probes that failed, since start.
    pub probes_failed: u64,
    pub last_probe: Option<LastProbe>,
    /// When the probe in flight was sent.
    in_flight: Option<Instant>,
    /// When the next probe is due; `None` until the first [`Health::due`] (then at once).
    next_probe: Option<Instant>,
}

/// A change of state, for the log and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

impl Health {
    /// A destination never probed: `probing` when probing is on, else `active`.
    pub fn new(rules: &Rules) -> Health {
        let state = match rules.interval {
            Some(_) => State::Probing,
            None => State::Active,
        };
        Health {
            state,
            alive_run: 0,
            failed_run: 0,
            probes_failed: 0,
            last_probe: None,
            in_flight: None,
            next_probe: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a probe must be sent now. Marks it in flight: the caller sends it and reports
    /// with [`Health::probe_answered`]; [`Health::probe_expired`] fails it after the timeout.
    pub fn due(&mut self, now: Instant, rules: &Rules) -> bool {
        let Some(interval) = rules.interval else {
            return false;
        };
        if self.state == State::Disabled || self.in_flight.is_some() {
            return false;
        }
        if self.next_probe.is_some_and(|at| now < at) {
            return false;
        }
        self.in_flight = Some(now);
        self.next_probe = Some(now + interval);
        true
    }

    /// Fails the probe in flight if it has waited longer than the timeout.
    pub fn probe_expired(&mut self, now: Instant, rules: &Rules) -> Option<Transition> {
        let sent = self.in_flight?;
        if now.saturating_duration_since(sent) < rules.timeout {
            return None;
        }
        self.probe_answered(ProbeOutcome::Timeout, now, rules)
    }

    /// The probe in flight ended. An answer with no probe in flight (a late one, or after
    /// the operator intervened) is ignored.
    pub fn probe_answered(
        &mut self,
        outcome: ProbeOutcome,
        now: Instant,
        rules: &Rules,
    ) -> Option<Transition> {
        self.in_flight.take()?;
        self.last_probe = Some(LastProbe { at: now, outcome });
        let alive = matches!(outcome, ProbeOutcome::Reply(code) if rules.alive.contains(code));
        if alive {
            self.alive_run = self.alive_run.saturating_add(1);
            self.failed_run = 0;
        } else {
            self.failed_run = self.failed_run.saturating_add(1);
            self.alive_run = 0;
            self.probes_failed += 1;
        }
        let next = match self.state {
            State::Probing if alive => State::Active,
            State::Probing => State::Inactive,
            State::Active if self.failed_run >= rules.down_after => State::Inactive,
            State::Inactive if self.alive_run >= rules.up_after => State::Active,
            other => other,
        };
        self.set(next)
    }

    /// A call sent here failed with `code` (408 for a timeout): `inactive` if `mark_on` says
    /// so. A disabled destination stays disabled.
    pub fn call_failed(&mut self, code: u16, rules: &Rules) -> Option<Transition> {
        if !rules.mark_on.contains(code) || self.state == State::Disabled {
            return None;
        }
        self.alive_run = 0;
        self.set(State::Inactive)
    }

    /// The operator or the script sets the state. Counters restart; `probing` and `inactive`
    /// get a probe at the next tick.
    pub fn mark(&mut self, state: State) -> Option<Transition> {
        self.alive_run = 0;
        self.failed_run = 0;
        self.in_flight = None;
        if matches!(state, State::Probing | State::Inactive) {
            self.next_probe = None;
        }
        self.set(state)
    }

    fn set(&mut self, state: State) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, state);
        (from != state).then_some(Transition { from, to: state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            interval: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(4),
            down_after: 2,
            up_after: 2,
            ..Rules::default()
        }
    }

    /// Sends the due probe at `now` and answers it.
    fn probe(health: &mut Health, now: Instant, outcome: ProbeOutcome) -> Option<Transition> {
        assert!(health.due(now, &rules()), "no probe due at {now:?}");
        health.probe_answered(outcome, now, &rules())
    }

    #[test]
    fn a_never_probed_destination_is_probing_until_its_first_answer() {
        let start = Instant::now();
        let mut health = Health::new(&rules());
        assert_eq!(health.state(), State::Probing);
        assert_eq!(health.state().tier(), Some(1));
        let t = probe(&mut health, start, ProbeOutcome::Reply(200));
        assert_eq!(
            t,
            Some(Transition {
                from: State::Probing,
                to: State::Active
            })
        );

        let mut dead = Health::new(&rules());
        assert!(dead.due(start, &rules()));
        assert_eq!(
            dead.probe_expired(start + Duration::from_secs(3), &rules()),
            None
        );
        let t = dead.probe_expired(start + Duration::from_secs(4), &rules());
        assert_eq!(t.map(|t| t.to), Some(State::Inactive));
        assert_eq!(dead.probes_failed, 1);
    }

    #[test]
    fn without_probing_the_configuration_is_trusted() {
        let off = Rules {
            interval: None,
            ..rules()
        };
        let mut health = Health::new(&off);
        assert_eq!(health.state(), State::Active);
        assert!(!health.due(Instant::now(), &off));
    }

    #[test]
    fn thresholds_take_down_and_bring_back() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut health = Health::new(&rules());
        probe(&mut health, at(0), ProbeOutcome::Reply(200));
        // Not due before the interval.
        assert!(!health.due(at(5), &rules()));
        assert_eq!(probe(&mut health, at(10), ProbeOutcome::Reply(503)), None);
        assert_eq!(
            health.state(),
            State::Active,
            "one failure is below down_after"
        );
        let t = probe(&mut health, at(20), ProbeOutcome::Unreachable);
        assert_eq!(t.map(|t| t.to), Some(State::Inactive));
        assert_eq!(probe(&mut health, at(30), ProbeOutcome::Reply(404)), None);
        let t = probe(&mut health, at(40), ProbeOutcome::Reply(501));
        assert_eq!(t.map(|t| t.to), Some(State::Active));
        assert_eq!(health.probes_failed, 2);
        assert_eq!(
            health.last_probe,
            Some(LastProbe {
                at: at(40),
                outcome: ProbeOutcome::Reply(501)
            })
        );
    }

    #[test]
    fn an_alive_answer_in_between_restarts_the_failure_count() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut health = Health::new(&rules());
        probe(&mut health, at(0), ProbeOutcome::Reply(200));
        probe(&mut health, at(10), ProbeOutcome::Timeout);
        probe(&mut health, at(20), ProbeOutcome::Reply(200));
        probe(&mut health, at(30), ProbeOutcome::Timeout);
        assert_eq!(health.state(), State::Active);
    }

    #[test]
    fn call_failures_mark_only_what_mark_on_lists() {
        let mut health = Health::new(&rules());
        health.mark(State::Active);
        assert_eq!(health.call_failed(486, &rules()), None);
        assert_eq!(health.call_failed(500, &rules()), None);
        let t = health.call_failed(503, &rules());
        assert_eq!(t.map(|t| t.to), Some(State::Inactive));
        health.mark(State::Active);
        assert!(health.call_failed(408, &rules()).is_some(), "timeout");
        health.mark(State::Disabled);
        assert_eq!(health.call_failed(503, &rules()), None);
    }

    #[test]
    fn disabled_is_not_probed_and_late_answers_are_ignored() {
        let start = Instant::now();
        let mut health = Health::new(&rules());
        assert!(health.due(start, &rules()));
        health.mark(State::Disabled);
        let late = health.probe_answered(ProbeOutcome::Reply(200), start, &rules());
        assert_eq!(late, None);
        assert_eq!(health.state(), State::Disabled);
        assert!(!health.due(start + Duration::from_secs(60), &rules()));
        health.mark(State::Probing);
        assert!(health.due(start + Duration::from_secs(61), &rules()));
    }

    #[test]
    fn code_sets_parse_codes_classes_and_timeout() {
        let set = CodeSet::parse(&["2xx".into(), "404".into(), "timeout".into()]).unwrap();
        assert!(set.contains(200) && set.contains(299) && set.contains(404));
        assert!(set.contains(408));
        assert!(!set.contains(503) && !set.contains(300));
        assert!(CodeSet::parse(&["2x".into()]).is_err());
        assert!(CodeSet::parse(&["99".into()]).is_err());
        assert!(CodeSet::parse(&["7xx".into()]).is_err());
        assert!(Rules::default().alive.contains(501));
        assert!(!Rules::default().alive.contains(503));
        assert!(Rules::default().mark_on.contains(503));
    }
}
