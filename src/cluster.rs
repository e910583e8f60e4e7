//! Several nodes on one shared location store (`[location] store = "redis"`): who this node
//! is, which bindings only it can reach, and which nodes are alive.
//!
//! # Node identity
//!
//! Each node has a SIP URI other nodes reach it at: `[location] node_uri`, by default its
//! first listener as it advertises itself (`sip:192.0.2.1:5060;transport=udp`). Every binding
//! a node registers records it ([`crate::location::Binding::node`]), which `ctl ul` shows.
//!
//! # Routing through the owning node (RFC 3327, RFC 5626 §5.3)
//!
//! A binding registered over a connection (TCP, TLS, WebSocket) or from behind a NAT is
//! reachable only through the connection or pinhole its node holds. Its node stores with it an
//! owner route, a Route to itself with a flow token it signed
//! ([`crate::proxy::route_sign`], "Owner routes"). A lookup on another node sends the branch
//! along it, as it would along a Path (§5.3 of RFC 3327: the route is pre-loaded); the owner
//! consumes its own entry (RFC 3261 §16.4), checks the token and delivers the request on the
//! flow. A binding with a Path is reached along its Path (the edge proxy holds the flow), a
//! plain UDP binding directly, from whichever node looks it up.
//!
//! The token is stored at REGISTER time rather than found again by the owner at call time
//! (a lookup by flow): the owner need not read the store again, a call through the owner costs
//! it no Redis round trip, and nothing but the owner can make a token it accepts.
//!
//! # Node liveness
//!
//! Each node writes a heartbeat to Redis every [`HEARTBEAT`] (the sorted set
//! `moonroute:nodes`, scored by the time in milliseconds) and reads which nodes wrote one
//! within [`ALIVE_WITHIN`]. A contact owned by a node that is not alive is not sent to: its
//! branch counts as 480 (Temporarily Unavailable) and the request is forked to the other
//! contacts (`moonroute_cluster_owner_down_total` counts them; the node going down and coming
//! back are logged once each). While Redis is unreachable the last known view is kept: a
//! node's own trouble with Redis says nothing about the others.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::location::Binding;
use crate::proxy::identity::LocalIdentity;
use crate::proxy::route_sign::{RouteSigner, FLOW_PARAM};
use crate::redis_link::RedisLink;
use crate::transport::{ListenAddr, TransportKind};

/// How often a node writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A node whose last heartbeat is older than this is down.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(5);

const NODES_KEY: &str = "moonroute:nodes";

/// The URI a node is reached at when `[location] node_uri` is empty: its first listener as it
/// advertises itself; `None` when that listener's port is chosen at start (port 0).
pub fn default_node_uri(domains: &[String], listen: &[ListenAddr]) -> Option<String> {
    let first = listen.first().filter(|l| l.addr.port() != 0)?;
    let identity = LocalIdentity::of_listeners(domains, listen);
    let sent_by = identity.sent_by(first.kind, Some(first.addr), first.addr);
    Some(format!(
        "sip:{sent_by};transport={}",
        first.kind.uri_param()
    ))
}

/// How a binding is reached from this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// As a single node reaches it: its contact, its Path, or its flow when this node owns it.
    Direct,
    /// Through its owning node, along this Route value.
    ThroughOwner(String),
    /// Its owning node is down: not reachable now.
    OwnerDown(String),
}

/// This node, as the other nodes of its cluster see it.
pub struct Node {
    uri: String,
    signer: RouteSigner,
    members: Arc<Members>,
    owner_down: AtomicU64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("uri", &self.uri).finish()
    }
}

impl crate::registrar::ClusterNode for Node {
    /// Records that `binding` was registered through this node, and, when only this node
    /// can reach it (a connection, or a NAT pinhole, and no Path leading elsewhere), the
    /// owner route other nodes reach it by.
    fn stamp(&self, binding: &mut Binding) {
        binding.node = Some(self.uri.clone());
        binding.owner_route = match binding.received {
            Some((kind, addr))
                if binding.path.is_empty() && (kind.is_stream() || binding.nated) =>
            {
                Some(self.owner_route(kind, addr))
            }
            _ => None,
        };
    }
}

impl Node {
    /// The node at `uri`, signing its owner routes with `signer` (from the server key), its
    /// heartbeat on `link` (started here, on a thread of its own, until the node is dropped).
    pub fn start(uri: String, signer: RouteSigner, link: Arc<RedisLink>) -> Arc<Node> {
        let members = Members::start(uri.clone(), link);
        Arc::new(Node {
            uri,
            signer,
            members,
            owner_down: AtomicU64::new(0),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `<node-uri;lr;mr-flow=TOKEN>` for the flow `kind` from `addr`.
    fn owner_route(&self, kind: TransportKind, addr: SocketAddr) -> String {
        format!(
            "<{};lr;{FLOW_PARAM}={}>",
            self.uri,
            self.signer.sign_flow(kind, addr)
        )
    }

    /// How this node reaches `binding`.
    pub fn reach(&self, binding: &Binding) -> Reach {
        let (Some(route), Some(owner)) = (&binding.owner_route, &binding.node) else {
            return Reach::Direct;
        };
        if *owner == self.uri {
            return Reach::Direct;
        }
        if self.members.is_alive(owner) {
            Reach::ThroughOwner(route.clone())
        } else {
            self.owner_down.fetch_add(1, Ordering::Relaxed);
            Reach::OwnerDown(owner.clone())
        }
    }

    /// Contacts not sent to because their owning node was down.
    pub fn owner_down_count(&self) -> u64 {
        self.owner_down.load(Ordering::Relaxed)
    }

    /// The nodes seen alive at the last heartbeat, sorted.
    pub fn alive(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.members.view().alive.into_iter().collect();
        nodes.sort();
        nodes
    }

    /// `moonroute_cluster_owner_down_total` and `moonroute_cluster_nodes_alive`.
    pub fn register_metrics(self: &Arc<Self>, registry: &crate::metrics::Registry) {
        let node = Arc::downgrade(self);
        registry.collect(
            "moonroute_cluster_owner_down_total",
            "Contacts not sent to because the node owning their connection or NAT pinhole was down (their branch counts as 480)",
            crate::metrics::Kind::Counter,
            Box::new(move |out| {
                let count = node.upgrade().map_or(0, |n| n.owner_down_count());
                out.sample("moonroute_cluster_owner_down_total", &[], count as f64);
            }),
        );
        let node = Arc::downgrade(self);
        registry.gauge_fn(
            "moonroute_cluster_nodes_alive",
            "Nodes of the cluster (this one included) whose heartbeat is recent",
            move || node.upgrade().map_or(0.0, |n| n.alive().len() as f64),
        );
    }
}

/// What the last heartbeat learnt.
#[derive(Clone, Default)]
struct View {
    alive: HashSet<String>,
    /// False until a heartbeat has read the set: every node counts as alive until then.
    known: bool,
}

/// The heartbeat and the view of which nodes are alive.
struct Members {
    view: Mutex<View>,
}

impl Members {
    fn start(me: String, link: Arc<RedisLink>) -> Arc<Members> {
        let members = Arc::new(Members {
            view: Mutex::new(View::default()),
        });
        let weak = Arc::downgrade(&members);
        let spawned = std::thread::Builder::new()
            .name("moonroute-heartbeat".to_owned())
            .spawn(move || heartbeat(&me, &link, &weak));
        if let Err(error) = spawned {
            warn!(%error, "cluster: cannot start the heartbeat thread; this node looks down to the others");
        }
        members
    }

    fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn is_alive(&self, node: &str) -> bool {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        !view.known || view.alive.contains(node)
    }

    /// Takes a new list of live nodes, logging the nodes that went and came.
    fn update(&self, alive: HashSet<String>) {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if view.known {
            for gone in view.alive.difference(&alive) {
                warn!(node = %gone, "cluster: node down (no heartbeat for {} s): its connection-bound and NATed contacts get 480", ALIVE_WITHIN.as_secs());
            }
            for back in alive.difference(&view.alive) {
                info!(node = %back, "cluster: node up");
            }
        }
        *view = View { alive, known: true };
    }
}

/// Writes this node's heartbeat and reads the others' every [`HEARTBEAT`], until the node is
/// dropped.
fn heartbeat(me: &str, link: &RedisLink, members: &Weak<Members>) {
    loop {
        let Some(members) = members.upgrade() else {
            return;
        };
        let now = unix_millis(SystemTime::now());
        let since = now.saturating_sub(ALIVE_WITHIN.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(NODES_KEY).arg(now).arg(me).ignore();
        // Nodes gone for long are forgotten (a day: far past any lookup's interest).
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(NODES_KEY)
            .arg("-inf")
            .arg(now.saturating_sub(86_400_000))
            .ignore();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(NODES_KEY)
            .arg(since)
            .arg("+inf");
        if let Ok((alive,)) = link.pipeline::<(Vec<String>,)>(pipe) {
            members.update(alive.into_iter().collect());
        }
        drop(members);
        std::thread::sleep(HEARTBEAT);
    }
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::ClusterNode;

    fn node(uri: &str) -> Node {
        Node {
            uri: uri.to_owned(),
            signer: RouteSigner::random(),
            members: Arc::new(Members {
                view: Mutex::new(View::default()),
            }),
            owner_down: AtomicU64::new(0),
        }
    }

    fn binding(kind: TransportKind, nated: bool) -> Binding {
        let mut b = Binding::new(
            "sip:alice@example.com",
            "sip:alice@192.0.2.1:5070",
            SystemTime::now() + Duration::from_secs(60),
            1000,
            "c".to_owned(),
            1,
        );
        b.received = Some((kind, "192.0.2.1:40000".parse().unwrap()));
        b.nated = nated;
        b
    }

    #[test]
    fn connection_bound_and_nated_bindings_get_an_owner_route_plain_udp_does_not() {
        let one = node("sip:127.0.0.1:5061;transport=udp");
        for (kind, nated, owned) in [
            (TransportKind::Tcp, false, true),
            (TransportKind::Ws, false, true),
            (TransportKind::Udp, true, true),
            (TransportKind::Udp, false, false),
        ] {
            let mut b = binding(kind, nated);
            one.stamp(&mut b);
            assert_eq!(b.node.as_deref(), Some(one.uri()));
            assert_eq!(b.owner_route.is_some(), owned, "{kind:?} nated {nated}");
        }
        // A Path leads to the edge proxy holding the flow: no owner route.
        let mut b = binding(TransportKind::Tcp, false);
        b.path = vec!["<sip:edge.example.com;lr>".to_owned()];
        one.stamp(&mut b);
        assert_eq!(b.owner_route, None);
    }

    #[test]
    fn the_owner_reaches_its_binding_directly_others_through_it_unless_it_is_down() {
        let one = node("sip:127.0.0.1:5061;transport=udp");
        let three = node("sip:127.0.0.1:5063;transport=udp");
        let mut b = binding(TransportKind::Tcp, false);
        one.stamp(&mut b);
        assert_eq!(one.reach(&b), Reach::Direct);
        let route = b.owner_route.clone().unwrap();
        assert!(
            route.starts_with("<sip:127.0.0.1:5061;transport=udp;lr;mr-flow=tcp:192.0.2.1:40000:"),
            "{route}"
        );
        assert_eq!(three.reach(&b), Reach::ThroughOwner(route));
        three.members.update(HashSet::from([three.uri.clone()]));
        assert_eq!(three.reach(&b), Reach::OwnerDown(one.uri.clone()));
        assert_eq!(three.owner_down_count(), 1);
        let mut plain = binding(TransportKind::Udp, false);
        one.stamp(&mut plain);
        assert_eq!(three.reach(&plain), Reach::Direct);
    }

    #[test]
    fn only_the_signing_node_accepts_its_flow_token() {
        let signer = RouteSigner::random();
        let flow = (TransportKind::Tcp, "[::1]:40000".parse().unwrap());
        let token = signer.sign_flow(flow.0, flow.1);
        assert_eq!(signer.check_flow(token.as_bytes()), Some(flow));
        assert_eq!(RouteSigner::random().check_flow(token.as_bytes()), None);
        let forged = token.replace("40000", "40001");
        assert_eq!(signer.check_flow(forged.as_bytes()), None);
        assert_eq!(signer.check_flow(b"tcp:1.2.3.4:5:"), None);
        assert_eq!(signer.check_flow(b""), None);
    }

    #[test]
    fn the_default_node_uri_is_the_first_listener_as_advertised() {
        let listen: Vec<ListenAddr> = vec![
            "tcp:127.0.0.1:5061,advertise=sip1.example.com"
                .parse()
                .unwrap(),
            "udp:127.0.0.1:5061".parse().unwrap(),
        ];
        assert_eq!(
            default_node_uri(&[], &listen).as_deref(),
            Some("sip:sip1.example.com:5061;transport=tcp")
        );
        let any: Vec<ListenAddr> = vec!["udp:127.0.0.1:0".parse().unwrap()];
        assert_eq!(default_node_uri(&[], &any), None);
    }
}
