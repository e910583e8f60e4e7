//! The probes of one event loop (the first): sends the probe request (`[dispatcher]
//! probe_method`, OPTIONS by default, RFC 3261 §11) to every destination when its health says
//! one is due, through a client transaction of the loop's transaction layer (§17.1.2: over UDP
//! a lost request or answer is retransmitted well before the probe timeout), and reports how
//! each ended to [`Dispatcher::probe_answered`].
//!
//! Sans-IO like the rest of the module: the caller (`server::core`) gives `now`, the
//! transaction layer and the output queues, and passes back the client events, DNS answers
//! and transport failures that belong to probes ([`Prober::owns`], [`Prober::owns_resolution`]).
//!
//! Where a probe goes is where a call to the destination would go: the next hop of its URI
//! (RFC 3263: an IP literal at once, a domain through the loop's resolver, the first address
//! a listener can reach). Responses find this loop by the loop index in the Via branch, as the
//! proxy's own branches do (`proxy::via_branch::owner_loop`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::debug;

use super::{Dispatcher, ProbeOutcome};
use crate::dns::{self, Candidate, ResolveError};
use crate::proxy::identity::{LocalIdentity, SERVER};
use crate::proxy::request::next_hop_of_uri;
use crate::sip::Message;
use crate::transaction::layer::{LayerOutput, TransactionLayer, TxId};
use crate::transaction::Event;
use crate::transport::{Destination, ListenAddr, TransportKind};

/// DNS resolutions of probes carry ids from here up, so the loop tells them from the proxy's
/// (which count up from 1).
pub const RESOLVE_ID_BASE: u64 = 1 << 62;

/// A probe on the wire.
struct InFlight {
    uri: Arc<str>,
    kind: TransportKind,
    addr: SocketAddr,
}

/// The probe schedule of one event loop and the probes it has out.
pub struct Prober {
    dispatcher: Arc<Dispatcher>,
    loop_index: usize,
    /// The loop's listeners: a probe leaves from the one of its next hop's transport and
    /// address family.
    bound: Vec<ListenAddr>,
    /// Makes Call-IDs, tags and branches differ across restarts.
    nonce: u64,
    /// How often due probes and timeouts are looked for.
    period: Duration,
    next_tick: Instant,
    sent: HashMap<TxId, InFlight>,
    resolving: HashMap<u64, Arc<str>>,
    next_resolve: u64,
    seq: u64,
}

/// At most this many DNS lookups for probes at once (a set file of unresolvable names must
/// not fill the resolver).
const MAX_RESOLVING: usize = 256;

impl Prober {
    /// The probes of `dispatcher`, sent from `bound`; `None` when probing is off. The first
    /// tick is at `now`: destinations never probed are `probing` until answered.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        loop_index: usize,
        bound: Vec<ListenAddr>,
        nonce: u64,
        now: Instant,
    ) -> Option<Prober> {
        let rules = dispatcher.rules();
        let interval = rules.interval?;
        Some(Prober {
            period: tick_period(interval, rules.timeout),
            dispatcher,
            loop_index,
            bound,
            nonce,
            next_tick: now,
            sent: HashMap::new(),
            resolving: HashMap::new(),
            next_resolve: RESOLVE_ID_BASE,
            seq: 0,
        })
    }

    pub fn next_deadline(&self) -> Instant {
        self.next_tick
    }

    /// When due: fails the probes past their timeout, sends the probes due now. DNS lookups
    /// needed go to `resolves`, to be answered with [`Prober::on_resolved`].
    pub fn on_tick(
        &mut self,
        now: Instant,
        identity: &LocalIdentity,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
        resolves: &mut Vec<(u64, dns::Query)>,
    ) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.period;
        for uri in self.dispatcher.due_probes(now) {
            self.start(uri, now, identity, layer, out, resolves);
        }
    }

    fn start(
        &mut self,
        uri: Arc<str>,
        now: Instant,
        identity: &LocalIdentity,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
        resolves: &mut Vec<(u64, dns::Query)>,
    ) {
        let query = match next_hop_of_uri(uri.as_bytes()) {
            Ok(hop) => dns::Query {
                host: hop.host,
                port: hop.port,
                transport: hop.transport,
                secure: hop.secure,
            },
            Err(error) => return self.failed(&uri, &error.to_string(), now),
        };
        match dns::numeric(&query) {
            Some(result) => self.send(uri, result, now, identity, layer, out),
            None if self.resolving.len() >= MAX_RESOLVING => {
                self.failed(&uri, "too many DNS lookups in flight", now)
            }
            None => {
                self.next_resolve += 1;
                self.resolving.insert(self.next_resolve, uri);
                resolves.push((self.next_resolve, query));
            }
        }
    }

    /// Whether DNS answer `id` is for a probe.
    pub fn owns_resolution(id: u64) -> bool {
        id >= RESOLVE_ID_BASE
    }

    /// The answer to a probe's DNS lookup: the probe goes out, or fails.
    pub fn on_resolved(
        &mut self,
        id: u64,
        result: Result<Vec<Candidate>, ResolveError>,
        now: Instant,
        identity: &LocalIdentity,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        if let Some(uri) = self.resolving.remove(&id) {
            self.send(uri, result, now, identity, layer, out);
        }
    }

    /// Sends the probe to the first of `candidates` a listener can reach.
    fn send(
        &mut self,
        uri: Arc<str>,
        candidates: Result<Vec<Candidate>, ResolveError>,
        now: Instant,
        identity: &LocalIdentity,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let candidates = match candidates {
            Ok(candidates) => candidates,
            Err(error) => return self.failed(&uri, &error.to_string(), now),
        };
        let usable = candidates.into_iter().find_map(|candidate| {
            let local = self.bound.iter().find(|l| {
                l.kind == candidate.kind && l.addr.is_ipv4() == candidate.addr.is_ipv4()
            })?;
            Some((candidate, local.addr))
        });
        let Some((candidate, local)) = usable else {
            return self.failed(&uri, "no listener for the destination's transport", now);
        };
        self.seq += 1;
        let request = self.request(&uri, &candidate, local, identity);
        let request = match Message::parse(request) {
            Ok(request) => request,
            Err(error) => return self.failed(&uri, &format!("cannot build: {error}"), now),
        };
        let dest = Destination {
            kind: candidate.kind,
            addr: candidate.addr,
            conn: None,
            local: Some(local),
            tls_name: candidate.tls_name.clone(),
            reuse_only: false,
        };
        match layer.send_request(request, dest, now, out) {
            Ok(tx) => {
                debug!(destination = %uri, addr = %candidate.addr, transport = %candidate.kind, "dispatcher probe sent");
                self.sent.insert(
                    tx,
                    InFlight {
                        uri,
                        kind: candidate.kind,
                        addr: candidate.addr,
                    },
                );
            }
            Err(error) => self.failed(&uri, &format!("{error:?}"), now),
        }
    }

    /// The probe request (RFC 3261 §8.1.1, §11.1): Request-URI and To the destination's URI,
    /// a Via of our listener with `rport`, `Max-Forwards: 70`, outside any dialog.
    fn request(
        &self,
        uri: &str,
        candidate: &Candidate,
        local: SocketAddr,
        identity: &LocalIdentity,
    ) -> Bytes {
        let source = identity.sent_by(candidate.kind, Some(local), candidate.addr);
        let (nonce, seq, method) = (self.nonce, self.seq, &self.dispatcher.rules().method);
        let mut text = String::with_capacity(400);
        // Writing into a String cannot fail.
        let _ = write!(
            text,
            "{method} {uri} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {source};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:dispatcher@{host}>;tag=ds{nonce:x}\r\n\
             To: <{uri}>\r\n\
             Call-ID: ds{seq}-{nonce:016x}@{host}\r\n\
             CSeq: 1 {method}\r\n\
             User-Agent: {agent}\r\n\
             Content-Length: 0\r\n\r\n",
            transport = candidate.kind.via_name(),
            host = source.host,
            branch = crate::proxy::via_branch::Stateful {
                hash: nonce,
                loop_index: self.loop_index,
                unique: seq,
            },
            agent = SERVER,
        );
        Bytes::from(text)
    }

    fn failed(&self, uri: &str, reason: &str, now: Instant) {
        debug!(destination = uri, reason, "dispatcher probe not sent");
        self.dispatcher
            .probe_answered(uri, ProbeOutcome::Unreachable, now);
    }

    /// Whether client transaction `tx` is a probe's.
    pub fn owns(&self, tx: TxId) -> bool {
        self.sent.contains_key(&tx)
    }

    /// An event of a probe's client transaction: a final response (any status, judged by
    /// `[dispatcher] alive_codes`), Timer F, or a transport failure ends the probe.
    pub fn on_client_event(&mut self, tx: TxId, event: Event, now: Instant) {
        let outcome = match event {
            Event::Response(response) => match response.status() {
                Some(code) if code >= 200 => ProbeOutcome::Reply(code),
                _ => return,
            },
            Event::Timeout => ProbeOutcome::Timeout,
            Event::TransportError => ProbeOutcome::Unreachable,
            Event::Ack(_) | Event::AckTimeout => return,
        };
        if let Some(probe) = self.sent.remove(&tx) {
            self.dispatcher.probe_answered(&probe.uri, outcome, now);
        }
    }

    /// A probe's transaction ended.
    pub fn on_terminated(&mut self, tx: TxId) {
        self.sent.remove(&tx);
        crate::memory::shrink_if_sparse(&mut self.sent);
    }

    /// The transport cannot reach `addr` (connection refused, no route): the probes sent
    /// there fail now rather than at their timeout.
    pub fn on_unreachable(
        &mut self,
        kind: TransportKind,
        addr: SocketAddr,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let failed: Vec<TxId> = self
            .sent
            .iter()
            .filter(|(_, probe)| probe.kind == kind && probe.addr == addr)
            .map(|(tx, _)| *tx)
            .collect();
        for tx in failed {
            // Comes back as Upcall::Client { TransportError }, to on_client_event.
            layer.on_transport_error(tx, out);
        }
    }
}

/// How often a loop looks for due probes and timeouts: a quarter of the shorter of the
/// interval and the timeout (a state change is seen at most that late), between 5 ms and
/// 250 ms (a walk over every destination is cheap but not free).
fn tick_period(interval: Duration, timeout: Duration) -> Duration {
    (interval.min(timeout) / 4).clamp(Duration::from_millis(5), Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatcher::{DestinationConfig, Rules, SetConfig, State};
    use crate::transaction::layer::LayerConfig;

    fn dispatcher(uris: &[&str]) -> Arc<Dispatcher> {
        let rules = Rules {
            interval: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(4),
            ..Rules::default()
        };
        let set = SetConfig {
            id: 1,
            destinations: uris
                .iter()
                .map(|uri| DestinationConfig {
                    uri: (*uri).to_owned(),
                    weight: 1,
                    priority: 0,
                    attrs: String::new(),
                })
                .collect(),
        };
        Arc::new(Dispatcher::new(rules, vec![set], None).unwrap())
    }

    fn udp_listener() -> Vec<ListenAddr> {
        vec![ListenAddr::new(
            TransportKind::Udp,
            "127.0.0.1:5060".parse().unwrap(),
        )]
    }

    /// A prober over `uris` (UDP listener, fresh transaction layer) after its first tick.
    struct Ticked {
        ds: Arc<Dispatcher>,
        identity: LocalIdentity,
        layer: TransactionLayer,
        now: Instant,
        prober: Prober,
        out: Vec<LayerOutput>,
        resolves: Vec<(u64, dns::Query)>,
    }

    fn first_tick(uris: &[&str]) -> Ticked {
        let ds = dispatcher(uris);
        let identity = LocalIdentity::of_listeners(&[], &udp_listener());
        let mut layer = TransactionLayer::new(LayerConfig::default());
        let now = Instant::now();
        let mut prober = Prober::new(ds.clone(), 0, udp_listener(), 7, now).unwrap();
        let (mut out, mut resolves) = (Vec::new(), Vec::new());
        prober.on_tick(now, &identity, &mut layer, &mut out, &mut resolves);
        Ticked {
            ds,
            identity,
            layer,
            now,
            prober,
            out,
            resolves,
        }
    }

    fn sent_requests(out: &[LayerOutput]) -> Vec<(Destination, Message)> {
        out.iter()
            .filter_map(|o| match o {
                LayerOutput::Send { dest, data } => {
                    Some((dest.clone(), Message::parse(data.clone()).unwrap()))
                }
                LayerOutput::Up(_) => None,
            })
            .collect()
    }

    fn tx_of(layer: &mut TransactionLayer, request: &Message, code: u16, now: Instant) -> Event {
        let response = crate::sip::ResponseBuilder::new(request, code, "Whatever")
            .to_tag(b"x")
            .build();
        let mut out = Vec::new();
        layer.on_response(
            Message::parse(response).unwrap(),
            crate::transport::Meta {
                kind: TransportKind::Udp,
                source: "127.0.0.2:5070".parse().unwrap(),
                local: "127.0.0.1:5060".parse().unwrap(),
                conn: None,
                worker: 0,
            },
            now,
            &mut out,
        );
        out.into_iter()
            .find_map(|o| match o {
                LayerOutput::Up(crate::transaction::layer::Upcall::Client { event, .. }) => {
                    Some(event)
                }
                _ => None,
            })
            .expect("the response reached the probe's transaction")
    }

    #[test]
    fn a_probe_is_an_options_to_the_destination_and_its_answer_sets_the_state() {
        let Ticked {
            ds,
            identity,
            mut layer,
            now,
            mut prober,
            mut out,
            mut resolves,
        } = first_tick(&["sip:127.0.0.2:5070", "sip:gw@127.0.0.3:5080;transport=udp"]);
        assert!(resolves.is_empty(), "IP literals need no DNS");
        let sent = sent_requests(&out);
        assert_eq!(sent.len(), 2);
        let (dest, request) = sent
            .iter()
            .find(|(d, _)| d.addr.port() == 5070)
            .expect("a probe to gw 1");
        assert_eq!(dest.local, Some("127.0.0.1:5060".parse().unwrap()));
        assert_eq!(request.method(), Some(&crate::sip::Method::Options));
        assert_eq!(
            request.request_uri_bytes(),
            Some(&b"sip:127.0.0.2:5070"[..])
        );
        assert_eq!(request.max_forwards(), Some(Ok(70)));
        let branch = request.top_via().unwrap().branch().unwrap().to_vec();
        assert_eq!(crate::proxy::via_branch::owner_loop(&branch), Some(0));
        // Not again before the interval.
        out.clear();
        prober.on_tick(
            now + Duration::from_secs(1),
            &identity,
            &mut layer,
            &mut out,
            &mut resolves,
        );
        assert!(sent_requests(&out).is_empty());

        let later = now + Duration::from_millis(30);
        let event = tx_of(&mut layer, request, 200, later);
        let tx = *prober
            .sent
            .keys()
            .find(|tx| prober.sent[tx].addr == dest.addr)
            .unwrap();
        prober.on_client_event(tx, event, later);
        assert_eq!(ds.state("sip:127.0.0.2:5070"), Some(State::Active));
        assert_eq!(
            ds.state("sip:gw@127.0.0.3:5080;transport=udp"),
            Some(State::Probing)
        );
        // The other never answers: failed at the timeout.
        prober.on_tick(
            now + Duration::from_secs(4),
            &identity,
            &mut layer,
            &mut out,
            &mut resolves,
        );
        assert_eq!(
            ds.state("sip:gw@127.0.0.3:5080;transport=udp"),
            Some(State::Inactive)
        );
    }

    #[test]
    fn a_named_destination_is_resolved_first_and_a_503_is_not_alive() {
        let Ticked {
            ds,
            identity,
            mut layer,
            now,
            mut prober,
            mut out,
            mut resolves,
        } = first_tick(&["sip:gw.example.net"]);
        assert!(out.is_empty());
        let (id, query) = resolves.pop().unwrap();
        assert!(Prober::owns_resolution(id));
        assert_eq!(query.host, "gw.example.net");
        let candidate = Candidate {
            kind: TransportKind::Udp,
            addr: "127.0.0.2:5070".parse().unwrap(),
            tls_name: None,
        };
        prober.on_resolved(
            id,
            Ok(vec![candidate]),
            now,
            &identity,
            &mut layer,
            &mut out,
        );
        let sent = sent_requests(&out);
        assert_eq!(sent.len(), 1);
        let tx = *prober.sent.keys().next().unwrap();
        assert!(prober.owns(tx));
        let event = tx_of(&mut layer, &sent[0].1, 503, now);
        prober.on_client_event(tx, event, now);
        assert_eq!(ds.state("sip:gw.example.net"), Some(State::Inactive));
        assert!(!prober.owns(tx));
    }

    #[test]
    fn a_destination_no_listener_reaches_fails_its_probe_at_once() {
        let Ticked { ds, out, .. } = first_tick(&["sip:127.0.0.2:5070;transport=tcp"]);
        assert!(out.is_empty());
        assert_eq!(
            ds.state("sip:127.0.0.2:5070;transport=tcp"),
            Some(State::Inactive)
        );
    }

    #[test]
    fn ticks_are_a_quarter_of_the_shorter_period_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(tick_period(ms(10_000), ms(4000)), ms(250));
        assert_eq!(tick_period(ms(200), ms(120)), ms(30));
        assert_eq!(tick_period(ms(10), ms(8)), ms(5));
    }
}
